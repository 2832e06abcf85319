//! The proxy's settings: its keys and defaults, their validation, which of them a reload
//! changes, and [`WorkerAddress`], the parsed form of a worker's `host:port`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Serialized};
use serde::{Deserialize, Serialize};
use tonic::transport::Endpoint;

use super::{
    Check, ConfigError, ConfigFile, Flags, bytes, client_tls, known_keys, layered, restart_only,
    server_tls,
};
use crate::ProofKind;
use crate::tls::{ClientTls, ServerTls};

/// Where the proxy reads its file when `--config` is not given.
pub const DEFAULT_PROXY_CONFIG: &str = "/etc/miden-prover-proxy/proxy.toml";

/// Where the proxy's control socket lives unless `control_socket` says otherwise; systemd's
/// `RuntimeDirectory=miden-prover-proxy` makes its directory, mode 0700.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/miden-prover-proxy/control.sock";

/// Where the proxy keeps the workers added at run time unless `state_file` says otherwise;
/// systemd's `StateDirectory=miden-prover-proxy` makes its directory, mode 0700.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/miden-prover-proxy/workers";

/// The proxy's built-in defaults (upstream's where it had one); every key the file accepts is a
/// field here, and a field whose default is `None` is a key too.
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
    tls_cert_file: &'static str,
    tls_key_file: &'static str,
    tls_worker_ca_file: &'static str,
    tls_client_cert_file: &'static str,
    tls_client_key_file: &'static str,
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
    // Plaintext on the main port unless a certificate is given; `https://` workers are checked
    // against the system's roots unless tls_worker_ca_file names a CA, and get no client
    // certificate unless tls_client_cert_file and tls_client_key_file name one.
    tls_cert_file: "",
    tls_key_file: "",
    tls_worker_ca_file: "",
    tls_client_cert_file: "",
    tls_client_key_file: "",
};

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

/// Validated proxy settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// Workers from the configuration, `host:port` each.
    pub workers: Vec<WorkerAddress>,
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
    /// TLS on the main port, `None` for plaintext (files re-read at every reload).
    pub tls: Option<ServerTls>,
    /// How `https://` workers are verified and what certificate the proxy shows them.
    pub worker_tls: ClientTls,
}

// The listeners, the proof type checked against every worker, the control socket and the state
// file are set up once; everything else a reload changes.
restart_only!(ProxySettings {
    bind_address => bind_address,
    port => port,
    status_bind_address => status_bind_address,
    status_port => status_port,
    metrics_port => metrics_port,
    prover_type => prover_type,
    control_socket => control_socket,
    state_file => state_file,
});

/// Everything needed to (re)load the proxy's configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfigSource {
    /// The TOML file, and whether `--config` named it.
    pub file: ConfigFile,
    /// Command-line values, the top layer.
    pub flags: Flags,
}

impl ProxyConfigSource {
    /// Loads and validates the layered configuration, reporting every problem at once.
    pub fn load(&self) -> Result<ProxySettings, ConfigError> {
        // `MPS_WORKER_*` belong to a worker that may share the environment.
        let env = Env::prefixed("MPS_").filter(|key| !key.as_str().starts_with("worker_"));
        let figment = layered(Serialized::defaults(PROXY_DEFAULTS), &self.file, env, &self.flags);
        let known = known_keys(&PROXY_DEFAULTS);
        let mut check = Check::new(&figment, &self.file, "MPS_", &known)?;
        let bind_address = check.parse_or("bind_address", Ipv4Addr::UNSPECIFIED.into(), ip);
        let settings = ProxySettings {
            workers: check.list("workers"),
            prover_type: check.parse_or("prover_type", ProofKind::Transaction, str::parse),
            bind_address,
            status_bind_address: check
                .parse_or("status_bind_address", None, ip_or_empty)
                .unwrap_or(bind_address),
            port: check.get("port"),
            status_port: check.get("status_port"),
            metrics_port: check.optional("metrics_port"),
            public_worker_addresses: check.get("public_worker_addresses"),
            max_workers: check.positive("max_workers"),
            timeout: check.duration("timeout"),
            connection_timeout: check.duration("connection_timeout"),
            max_queue_items: check.get("max_queue_items"),
            max_queue_wait: check.duration("max_queue_wait"),
            max_retries_per_request: check.get("max_retries_per_request"),
            poison_ttl: check.duration("poison_ttl"),
            proof_cache_size: bytes(check.size("proof_cache_size", 0, u64::MAX)),
            proof_cache_ttl: check.duration("proof_cache_ttl"),
            max_req_per_sec: check.get("max_req_per_sec"),
            rate_limit_ipv6_prefix: check.within("rate_limit_ipv6_prefix", 1..=128),
            trusted_forwarders: check.list("trusted_forwarders"),
            proxy_protocol: check.get("proxy_protocol"),
            client_bounds: client_bounds(&mut check),
            health_check_interval: check.duration("health_check_interval"),
            health_check_timeout: check.duration("health_check_timeout"),
            grace_period: check.duration("grace_period"),
            graceful_shutdown_timeout: check.duration("graceful_shutdown_timeout"),
            log_filter: check.log_filter("log_filter"),
            control_socket: check
                .parse_or("control_socket", None, |s| absolute_or_off(s, "the socket")),
            state_file: check.parse_or("state_file", None, |s| {
                absolute_or_off(s, "keeping run-time workers across restarts")
            }),
            tls: server_tls(&mut check, "tls_cert_file", "tls_key_file", None),
            worker_tls: client_tls(
                &mut check,
                "tls_worker_ca_file",
                "tls_client_cert_file",
                "tls_client_key_file",
            ),
        };
        workers_within_max(&mut check, &settings);
        check.finish()?;
        Ok(settings)
    }
}

/// An IP address.
fn ip(value: &str) -> Result<IpAddr, String> {
    value.parse::<IpAddr>().map_err(|err| format!("`{value}` is not an IP address: {err}"))
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

/// The configured list may not exceed `max_workers`.
fn workers_within_max(check: &mut Check<'_>, settings: &ProxySettings) {
    let (count, max) = (settings.workers.len(), settings.max_workers);
    if check.valid(&["workers", "max_workers"]) && count > max {
        check.problem(
            "workers",
            format!(
                "{count} workers, more than max_workers ({max}); raise max_workers or split the \
                 workers across proxies"
            ),
        );
    }
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
fn client_bounds(check: &mut Check<'_>) -> ClientBounds {
    let most = crate::wire::MAX_MESSAGE_SIZE as u64;
    let max_request_size = check.size("max_request_size", 1 << 10, most);
    let bounds = ClientBounds {
        max_request_size: bytes(max_request_size),
        request_timeout: check.positive_duration("request_timeout"),
        handshake_timeout: check.positive_duration("handshake_timeout"),
        idle_timeout: check.positive_duration("idle_timeout"),
        max_connections: check.positive("max_connections"),
        max_connections_per_client: check.positive("max_connections_per_client"),
        max_buffered: bytes(check.size("max_buffered", 1 << 10, u64::MAX)),
        max_buffered_per_client: bytes(check.size("max_buffered_per_client", 1 << 10, u64::MAX)),
    };
    let budgets = ["max_request_size", "max_buffered", "max_buffered_per_client"];
    if check.valid(&budgets) {
        let smallest = [
            ("max_buffered", bounds.max_buffered),
            ("max_buffered_per_client", bounds.max_buffered_per_client),
        ]
        .into_iter()
        .find(|&(_, budget)| budget < bounds.max_request_size);
        if let Some((key, budget)) = smallest {
            check.problem(
                key,
                format!(
                    "{budget} bytes is less than max_request_size ({max_request_size} bytes): no \
                     request of that size could ever be admitted"
                ),
            );
        }
    }
    bounds
}

/// A worker's address as the proxy dials it: `host:port`, where host is a name or an IP address
/// (IPv6 in brackets), optionally after `http://` (the default, cleartext HTTP/2) or `https://`
/// (TLS, checked against `tls_worker_ca_file`). Parsed where an address enters (configuration,
/// control socket), so code that holds one never checks a string again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerAddress(String);

/// Why a string is not a [`WorkerAddress`]; the message names the address and the fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidWorkerAddress(String);

impl WorkerAddress {
    /// The address as written: `host:port`, `http://host:port` or `https://host:port`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the proxy speaks TLS to this worker (`https://`).
    pub fn is_tls(&self) -> bool {
        self.0.starts_with(HTTPS)
    }

    /// `host:port`, without the scheme.
    pub fn authority(&self) -> &str {
        self.0.strip_prefix(HTTPS).or_else(|| self.0.strip_prefix(HTTP)).unwrap_or(&self.0)
    }

    /// The host, without brackets around an IPv6 address.
    pub fn host(&self) -> &str {
        let host = self.authority().rsplit_once(':').map_or("", |(host, _)| host);
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
    }

    /// Whether the host is a name (resolved by DNS to the workers it stands for), not an IP
    /// address.
    pub fn is_name(&self) -> bool {
        self.host().parse::<IpAddr>().is_err()
    }

    /// The worker at `addr`, one of the addresses this name resolved to, with its scheme.
    #[must_use]
    pub fn member(&self, addr: std::net::SocketAddr) -> WorkerAddress {
        let scheme = if self.is_tls() {
            HTTPS
        } else if self.0.starts_with(HTTP) {
            HTTP
        } else {
            ""
        };
        WorkerAddress(format!("{scheme}{addr}"))
    }

    /// The gRPC endpoint the proxy dials (without its TLS settings).
    pub fn endpoint(&self) -> Endpoint {
        endpoint(&self.0).unwrap_or_else(|_| unreachable!("checked when `{self}` was parsed"))
    }
}

const HTTPS: &str = "https://";
const HTTP: &str = "http://";

/// `address` as an HTTP/2 endpoint; fails when it is not a URI's authority.
fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    if address.starts_with(HTTPS) || address.starts_with(HTTP) {
        Endpoint::from_shared(address.to_owned())
    } else {
        Endpoint::from_shared(format!("{HTTP}{address}"))
    }
}

impl PartialEq<&str> for WorkerAddress {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl FromStr for WorkerAddress {
    type Err = InvalidWorkerAddress;

    fn from_str(address: &str) -> Result<Self, Self::Err> {
        let fault = |reason: String| InvalidWorkerAddress(reason);
        let authority =
            address.strip_prefix(HTTPS).or_else(|| address.strip_prefix(HTTP)).unwrap_or(address);
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| fault(format!("`{address}` is not host:port (no port)")))?;
        port.parse::<u16>()
            .map_err(|_| fault(format!("`{address}`: `{port}` is not a port number")))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
            return Err(fault(format!("`{address}`: `{host}` is not a host name or IP address")));
        }
        endpoint(address).map_err(|err| fault(format!("`{address}`: {err}")))?;
        Ok(WorkerAddress(address.to_owned()))
    }
}

impl TryFrom<String> for WorkerAddress {
    type Error = InvalidWorkerAddress;

    fn try_from(address: String) -> Result<Self, Self::Error> {
        address.parse()
    }
}

impl From<WorkerAddress> for String {
    fn from(address: WorkerAddress) -> Self {
        address.0
    }
}

impl fmt::Display for WorkerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use crate::config::Reloadable;
    use std::path::Path;

    use figment::Jail;

    use super::*;
    use crate::config::documented;

    fn proxy_source() -> ProxyConfigSource {
        ProxyConfigSource {
            file: ConfigFile { path: PathBuf::from("proxy.toml"), explicit: false },
            flags: Flags::default(),
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
        let shipped = include_str!("../../etc/proxy.toml");
        documented::check_shipped_file("etc/proxy.toml", shipped, &PROXY_DEFAULTS);
        Jail::expect_with(|jail| {
            jail.create_file("proxy.toml", shipped)?;
            let settings = proxy_source().load().expect("the shipped file is valid");
            assert!(settings.status_bind_address.is_loopback(), "status and metrics stay local");
            assert!(settings.bind_address.is_unspecified(), "the gRPC port stays public");
            Ok(())
        });
    }

    #[test]
    fn the_readme_table_lists_every_key_its_default_and_whether_a_reload_applies_it() {
        documented::check_readme(
            "Proxy configuration",
            "MPS_",
            &PROXY_DEFAULTS,
            ProxySettings::RESTART_ONLY,
        );
    }

    #[test]
    fn every_bad_value_is_reported_and_budgets_hold_a_request() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "proxy.toml",
                "workers = [\"nowhere\", \"a:b\", \"ok:1\"]\nrate_limit_ipv6_prefix = 0\n\
                 trusted_forwarders = [\"10.0.0.0/99\"]\nmax_buffered_per_client = \"1KiB\"\n\
                 metrics_port = \"x\"\nmax_worker = 3\n",
            )?;
            let err = proxy_source().load().expect_err("seven problems");
            let text = err.to_string();
            assert!(text.contains("7 problems"), "{text}");
            assert!(text.contains("`nowhere` is not host:port (no port)"), "{text}");
            assert!(text.contains("`a:b`: `b` is not a port number"), "{text}");
            assert!(
                text.contains("key `rate_limit_ipv6_prefix`: must be 1 to 128, not 0"),
                "{text}"
            );
            assert!(text.contains("key `trusted_forwarders`"), "{text}");
            assert!(
                text.contains(
                    "key `max_buffered_per_client`: 1024 bytes is less than max_request_size"
                ),
                "{text}"
            );
            assert!(text.contains("key `metrics_port`"), "{text}");
            assert!(text.contains("key `max_worker`: unknown key"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn a_reload_applies_live_settings_and_names_the_others() {
        Jail::expect_with(|jail| {
            let running = proxy_source().load().expect("defaults are valid");
            jail.create_file(
                "proxy.toml",
                "port = 1\nmetrics_port = 9090\nstate_file = \"\"\ntimeout = \"1s\"\n\
                 workers = [\"10.0.0.1:1\"]\nmax_connections = 5\n",
            )?;
            let new = proxy_source().load().expect("valid");
            assert_eq!(running.restart_only_changes(&new), ["port", "metrics_port", "state_file"]);
            let mut applied = running.clone();
            applied.apply_live(new);
            assert_eq!((applied.port, applied.metrics_port), (8082, None));
            assert_eq!(applied.state_file, running.state_file);
            assert_eq!(applied.timeout, Duration::from_secs(1));
            assert_eq!(applied.workers, ["10.0.0.1:1"]);
            assert_eq!(applied.client_bounds.max_connections, 5);
            assert!(applied.restart_only_changes(&running).is_empty());
            Ok(())
        });
    }

    #[test]
    fn a_worker_address_is_host_colon_port() {
        for good in ["10.0.0.7:50051", "prover.internal:1", "[::1]:8082"] {
            let address: WorkerAddress = good.parse().expect("valid");
            assert_eq!(address.to_string(), good);
            assert_eq!(address.as_str(), good);
        }
        let fault = |text: &str| text.parse::<WorkerAddress>().expect_err(text).to_string();
        assert_eq!(fault("host"), "`host` is not host:port (no port)");
        assert_eq!(fault("host:99999"), "`host:99999`: `99999` is not a port number");
        assert_eq!(fault(":1"), "`:1`: `` is not a host name or IP address");
        assert_eq!(fault("a b:1"), "`a b:1`: `a b` is not a host name or IP address");
        assert_eq!(fault("user@h:1"), "`user@h:1`: `user@h` is not a host name or IP address");
        let parsed: Vec<WorkerAddress> =
            serde_json::from_str(r#"["h:1"]"#).expect("serde parses through FromStr");
        assert_eq!(parsed, ["h:1".parse::<WorkerAddress>().expect("valid")]);
        assert!(serde_json::from_str::<WorkerAddress>(r#""h""#).is_err());
        assert_eq!(fault("h%zz:1"), "`h%zz:1`: invalid URI");
        // A scheme says whether the proxy speaks TLS to it; the address is kept as written.
        for (written, tls) in [("https://w.internal:50051", true), ("http://10.0.0.7:1", false)] {
            let address: WorkerAddress = written.parse().expect("valid");
            assert_eq!((address.as_str(), address.is_tls()), (written, tls));
            assert_eq!(address.endpoint().uri().to_string(), format!("{written}/"));
        }
        assert!(!"h:1".parse::<WorkerAddress>().expect("valid").is_tls());
        // A name stands for the addresses it resolves to; each keeps the name's scheme.
        let name: WorkerAddress = "https://provers.internal:50051".parse().expect("valid");
        assert!(name.is_name());
        assert_eq!((name.host(), name.authority()), ("provers.internal", "provers.internal:50051"));
        let member = name.member("[fd00::5]:50051".parse().expect("addr"));
        assert_eq!(member.as_str(), "https://[fd00::5]:50051");
        assert!(!member.is_name());
        assert!(!"[::1]:1".parse::<WorkerAddress>().expect("valid").is_name());
        assert_eq!(fault("https://h"), "`https://h` is not host:port (no port)");
        assert_eq!(
            fault("https://h/x:1"),
            "`https://h/x:1`: `h/x` is not a host name or IP address"
        );
    }
}
