//! The worker's settings: its keys and defaults, their validation, and which of them a reload
//! changes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use figment::providers::{Env, Serialized};
use serde::Serialize;

use super::{
    Check, ConfigError, ConfigFile, Flags, bytes, known_keys, layered, restart_only, server_tls,
};
use crate::ProofKind;
use crate::tls::ServerTls;

/// Where the worker reads its file when `--config` is not given.
pub const DEFAULT_WORKER_CONFIG: &str = "/etc/miden-prover/worker.toml";

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
    /// Batch or block proofs one prover process makes before it is replaced.
    proofs_per_prover_process: usize,
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
    /// PEM certificate chain served on the port; "" serves plaintext.
    tls_cert_file: &'static str,
    /// PEM private key of `tls_cert_file`.
    tls_key_file: &'static str,
    /// PEM CA that clients' certificates must chain to (mutual TLS); "" asks for none.
    tls_client_ca_file: &'static str,
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
    // A batch or block prover keeps nothing between proofs, so a process that gave a proof may
    // take the next request: a new process costs a batch more than its proof (BENCHMARKS.md).
    // Replacing it now and then bounds what a long-lived process could gather all the same.
    proofs_per_prover_process: 64,
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
    // Plaintext on loopback (the packaged worker's proxy is local); TLS for a worker on another
    // host, with the proxy's certificate required where only its proxies may use it.
    tls_cert_file: "",
    tls_key_file: "",
    tls_client_ca_file: "",
};

/// Limits every prover process runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Address-space limit in bytes (`RLIMIT_AS`).
    pub memory: u64,
    /// Wall-clock limit of one proof, from the moment the worker hands over the payload.
    pub max_proof_time: Duration,
    /// Batch or block proofs one prover process makes before it is replaced (1: a process per
    /// proof). A transaction prover process always makes one.
    pub proofs_per_process: usize,
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
    /// TLS on the port, `None` for plaintext; files re-read at every reload, and connections
    /// accepted after it get what they hold now.
    pub tls: Option<ServerTls>,
}

// The listener and the transport are built once; everything else a reload changes.
restart_only!(WorkerSettings {
    port => port,
    localhost => localhost,
    prover_type => prover_type,
    max_request_size => bounds.max_request_size,
    request_timeout => bounds.request_timeout,
    handshake_timeout => bounds.handshake_timeout,
    max_connections => bounds.max_connections,
});

impl WorkerSettings {
    /// The socket address the gRPC listener binds.
    pub fn listen_addr(&self) -> SocketAddr {
        let ip = if self.localhost { Ipv4Addr::LOCALHOST } else { Ipv4Addr::UNSPECIFIED };
        SocketAddr::new(IpAddr::V4(ip), self.port)
    }
}

/// Everything needed to (re)load the worker's configuration: reload reads the same sources again.
#[derive(Clone, Debug)]
pub struct WorkerConfigSource {
    /// The TOML file, and whether it was named explicitly (then it must exist).
    pub file: ConfigFile,
    /// Command-line values, the top layer.
    pub flags: Flags,
}

impl WorkerConfigSource {
    /// Loads and validates the layered configuration, reporting every problem at once.
    pub fn load(&self) -> Result<WorkerSettings, ConfigError> {
        let env = Env::prefixed("MPS_WORKER_");
        let figment = layered(Serialized::defaults(WORKER_DEFAULTS), &self.file, env, &self.flags);
        let known = known_keys(&WORKER_DEFAULTS);
        let mut check = Check::new(&figment, &self.file, "MPS_WORKER_", &known)?;
        let most_request = crate::wire::MAX_MESSAGE_SIZE as u64;
        let settings = WorkerSettings {
            port: check.get("port"),
            localhost: check.get("localhost"),
            prover_type: check.parse_or("prover_type", ProofKind::Transaction, str::parse),
            grace_period: check.duration("grace_period"),
            log_filter: check.log_filter("log_filter"),
            limits: Limits {
                // At least what a transaction proof needs, so a typo ("8MiB") is an error, not a
                // worker whose every proof fails.
                memory: check.size("prover_memory_limit", 1 << 30, u64::MAX),
                max_proof_time: check.positive_duration("max_proof_time"),
                proofs_per_process: check.positive("proofs_per_prover_process"),
            },
            bounds: Bounds {
                max_request_size: bytes(check.size("max_request_size", 1 << 10, most_request)),
                request_timeout: check.positive_duration("request_timeout"),
                handshake_timeout: check.positive_duration("handshake_timeout"),
                max_connections: check.positive("max_connections"),
            },
            proof_cache_size: bytes(check.size("proof_cache_size", 0, u64::MAX)),
            proof_cache_ttl: check.duration("proof_cache_ttl"),
            tls: server_tls(
                &mut check,
                "tls_cert_file",
                "tls_key_file",
                Some("tls_client_ca_file"),
            ),
        };
        check.finish()?;
        Ok(settings)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use crate::config::Reloadable;
    use std::path::PathBuf;

    use clap::Parser;
    use figment::Jail;

    use super::*;
    use crate::cli::{Cli, Command};

    /// The flags `start-worker ARGS` gives.
    fn flags(args: &[&str]) -> Flags {
        let command_line = ["miden-proving-service", "start-worker"].iter().chain(args);
        let Command::StartWorker(args) =
            Cli::try_parse_from(command_line).expect("valid flags").command
        else {
            panic!("start-worker parses as StartWorker");
        };
        args.config_source().flags
    }

    fn source(flags: Flags) -> WorkerConfigSource {
        WorkerConfigSource {
            file: ConfigFile { path: PathBuf::from("worker.toml"), explicit: false },
            flags,
        }
    }

    #[test]
    fn defaults_apply_without_file_env_or_flags() {
        Jail::expect_with(|_jail| {
            let settings = source(flags(&[])).load().expect("defaults are valid");
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
            let settings = source(flags(&[])).load().expect("valid");
            assert_eq!(settings.port, 1000, "file beats default");
            assert_eq!(settings.prover_type, ProofKind::Batch, "file beats default");
            assert_eq!(settings.grace_period, Duration::from_secs(5));
            assert!(settings.localhost, "--localhost left out leaves the file's value");

            jail.set_env("MPS_WORKER_PORT", "2000");
            jail.set_env("MPS_WORKER_PROVER_TYPE", "block");
            let settings = source(flags(&[])).load().expect("valid");
            assert_eq!(settings.port, 2000, "environment beats file");
            assert_eq!(settings.prover_type, ProofKind::Block, "environment beats file");
            assert_eq!(settings.grace_period, Duration::from_secs(5), "file still applies");

            let settings = source(flags(&["--port", "3000", "--prover-type", "Transaction"]))
                .load()
                .expect("valid");
            assert_eq!(settings.port, 3000, "flag beats environment");
            assert_eq!(settings.prover_type, ProofKind::Transaction, "flag beats environment");

            jail.create_file("worker.toml", "localhost = false\n")?;
            assert!(source(flags(&["--localhost"])).load().expect("valid").localhost);
            Ok(())
        });
    }

    #[test]
    fn rust_log_overrides_the_configured_filter() {
        Jail::expect_with(|jail| {
            jail.create_file("worker.toml", "log_filter = \"warn\"\n")?;
            assert_eq!(source(flags(&[])).load().expect("valid").log_filter, "warn");
            jail.set_env("RUST_LOG", "debug");
            assert_eq!(source(flags(&[])).load().expect("valid").log_filter, "debug");
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
            let err = source(flags(&[])).load().expect_err("four problems");
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
            let err = source(flags(&["--prover-type", "tx"])).load().expect_err("bad flag");
            assert!(err.to_string().contains("command-line flag --prover-type"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn broken_toml_and_missing_explicit_file_are_errors() {
        Jail::expect_with(|jail| {
            jail.create_file("worker.toml", "port = [\n")?;
            let err = source(flags(&[])).load().expect_err("syntax error");
            assert!(err.to_string().contains("worker.toml"), "{err}");

            let missing = WorkerConfigSource {
                file: ConfigFile { path: PathBuf::from("nope.toml"), explicit: true },
                flags: flags(&[]),
            };
            let err = missing.load().expect_err("missing explicit file");
            assert!(err.to_string().contains("nope.toml: the configuration file does not exist"));
            Ok(())
        });
    }

    #[test]
    fn hostile_input_bounds_have_defaults_and_are_checked() {
        Jail::expect_with(|jail| {
            let settings = source(flags(&[])).load().expect("defaults are valid");
            assert_eq!(settings.limits.memory, 8 << 30);
            assert_eq!(settings.limits.max_proof_time, Duration::from_secs(90));
            assert_eq!(settings.limits.proofs_per_process, 64);
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
                 proof_cache_size = \"lots\"\nproofs_per_prover_process = 0\n",
            )?;
            let err = source(flags(&[])).load().expect_err("six problems");
            let text = err.to_string();
            assert!(text.contains("6 problems"), "{text}");
            assert!(text.contains("key `proofs_per_prover_process`: must be at least 1"), "{text}");
            assert!(text.contains("key `proof_cache_size`"), "{text}");
            assert!(text.contains("key `prover_memory_limit`: 8388608 bytes is outside"), "{text}");
            assert!(text.contains("key `max_proof_time`: must be longer than 0s"), "{text}");
            assert!(text.contains("key `max_request_size`"), "{text}");
            assert!(text.contains("key `max_connections`: must be at least 1"), "{text}");
            jail.create_file("worker.toml", "max_request_size = 65536\nproof_cache_size = 0\n")?;
            jail.set_env("MPS_WORKER_PROVER_MEMORY_LIMIT", "3GiB");
            jail.set_env("MPS_WORKER_PROOFS_PER_PROVER_PROCESS", "1");
            let settings = source(flags(&[])).load().expect("valid");
            assert_eq!(settings.limits.proofs_per_process, 1, "1: a process per proof");
            assert_eq!(settings.proof_cache_size, 0, "0 turns the cache off");
            assert_eq!(settings.bounds.max_request_size, 65536);
            assert_eq!(settings.limits.memory, 3 << 30);
            Ok(())
        });
    }

    #[test]
    fn tls_files_are_read_with_the_configuration_and_checked_together() {
        Jail::expect_with(|jail| {
            assert_eq!(source(flags(&[])).load().expect("defaults").tls, None, "plaintext");
            jail.create_file("cert.pem", "not a certificate\n")?;
            jail.create_file(
                "worker.toml",
                "tls_cert_file = \"cert.pem\"\ntls_key_file = \"/nonexistent/key.pem\"\n",
            )?;
            let text = source(flags(&[])).load().expect_err("two problems").to_string();
            assert!(
                text.contains("key `tls_cert_file`: cert.pem: holds no PEM certificate"),
                "{text}"
            );
            assert!(
                text.contains("key `tls_key_file`: cannot read /nonexistent/key.pem"),
                "{text}"
            );
            jail.create_file("ca.pem", "")?;
            jail.create_file("worker.toml", "tls_client_ca_file = \"/nonexistent/ca.pem\"\n")?;
            let text = source(flags(&[])).load().expect_err("unreadable CA").to_string();
            assert!(text.contains("key `tls_client_ca_file`: cannot read"), "{text}");
            jail.create_file("worker.toml", "tls_client_ca_file = \"ca.pem\"\n")?;
            let text = source(flags(&[])).load().expect_err("empty CA").to_string();
            assert!(text.contains("ca.pem: holds no PEM certificate"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn the_shipped_worker_file_is_valid_and_shows_every_key() {
        let shipped = include_str!("../../etc/worker.toml");
        super::super::documented::check_shipped_file("etc/worker.toml", shipped, &WORKER_DEFAULTS);
        Jail::expect_with(|jail| {
            jail.create_file("worker.toml", shipped)?;
            let settings = source(flags(&[])).load().expect("the shipped file is valid");
            assert!(settings.localhost, "the packaged worker listens on loopback");
            Ok(())
        });
    }

    #[test]
    fn the_readme_table_lists_every_key_its_default_and_whether_a_reload_applies_it() {
        super::super::documented::check_readme(
            "Configuration",
            "MPS_WORKER_",
            &WORKER_DEFAULTS,
            WorkerSettings::RESTART_ONLY,
        );
    }

    #[test]
    fn a_reload_applies_live_settings_and_names_the_others() {
        Jail::expect_with(|jail| {
            let running = source(flags(&[])).load().expect("defaults are valid");
            jail.create_file(
                "worker.toml",
                "port = 1\nmax_connections = 2\ngrace_period = \"1s\"\nmax_proof_time = \"2s\"\n",
            )?;
            let new = source(flags(&[])).load().expect("valid");
            assert_eq!(running.restart_only_changes(&new), ["port", "max_connections"]);
            let mut applied = running.clone();
            applied.apply_live(new);
            assert_eq!(applied.port, running.port);
            assert_eq!(applied.bounds, running.bounds);
            assert_eq!(applied.grace_period, Duration::from_secs(1));
            assert_eq!(applied.limits.max_proof_time, Duration::from_secs(2));
            assert!(applied.restart_only_changes(&running).is_empty());
            Ok(())
        });
    }
}
