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
}

const WORKER_DEFAULTS: WorkerDefaults = WorkerDefaults {
    port: 50051,
    localhost: false,
    prover_type: "transaction",
    grace_period: "60s",
    // miden-prover logs its execution-trace size at info; one line per request is ours.
    log_filter: "info,miden_prover=warn",
};

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
}

impl WorkerSettings {
    /// The socket address the gRPC listener binds.
    pub fn listen_addr(&self) -> SocketAddr {
        let ip = if self.localhost { Ipv4Addr::LOCALHOST } else { Ipv4Addr::UNSPECIFIED };
        SocketAddr::new(IpAddr::V4(ip), self.port)
    }

    /// Names the settings that differ from `other` and only take effect after a restart.
    pub fn restart_only_changes(&self, other: &WorkerSettings) -> Vec<&'static str> {
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
        changed
    }
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
            "MPS_WORKER_",
            FlagProvider(&self.flags),
        );
        let mut check = Check::new(&figment, &self.file, "MPS_WORKER_")?;
        check.unknown_keys(&["port", "localhost", "prover_type", "grace_period", "log_filter"]);
        let port = check.get::<u16>("port");
        let localhost = check.get::<bool>("localhost");
        let prover_type = check.parse("prover_type", |s: String| s.parse::<ProofKind>());
        let grace_period = check.duration("grace_period");
        let log_filter = check.log_filter("log_filter");
        check.finish()?;
        match (port, localhost, prover_type, grace_period, log_filter) {
            (
                Some(port),
                Some(localhost),
                Some(prover_type),
                Some(grace_period),
                Some(log_filter),
            ) => Ok(WorkerSettings { port, localhost, prover_type, grace_period, log_filter }),
            _ => unreachable!("Check::finish fails when any key failed"),
        }
    }
}

// SHARED MACHINERY
// ================================================================================================

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
    env_prefix: &str,
    flags: impl Provider,
) -> Figment {
    let mut figment = Figment::new().merge(defaults);
    // An absent default file means "built-in defaults"; an absent `--config` file was already
    // reported by `Check::new`.
    if file.path.exists() {
        figment = figment.merge(Toml::file_exact(&file.path));
    }
    figment.merge(Env::prefixed(env_prefix)).merge(flags)
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
}
