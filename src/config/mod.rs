//! Configuration in two stages: layered raw values (built-in default < TOML file < `MPS_*`
//! environment < command-line flag, merged by figment), then validated settings.
//!
//! Validation looks at every key and reports every problem at once, each naming where the value
//! came from (the file path, the environment variable or the flag), the key and the reason, so an
//! operator fixes a broken file in one round. It runs before any port is bound.
//!
//! Each daemon's keys are named once, as the fields of its defaults (`worker.rs`, `proxy.rs`): the
//! known keys are read off those, and `Check`'s getters never fail, so a daemon's `load` is one
//! struct literal followed by `Check::finish`. This module holds what both share.

mod proxy;
mod worker;

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::tls;

pub use self::proxy::{
    ClientBounds, DEFAULT_CONTROL_SOCKET, DEFAULT_PROXY_CONFIG, DEFAULT_STATE_FILE,
    InvalidWorkerAddress, ProxyConfigSource, ProxySettings, WorkerAddress,
};
pub use self::worker::{Bounds, DEFAULT_WORKER_CONFIG, Limits, WorkerConfigSource, WorkerSettings};

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

/// Settings as a reload sees them: which changes need a restart, and how the rest are taken.
/// Implemented through [`restart_only!`] beside each daemon's settings.
pub trait Reloadable: Sized {
    /// The log filter (`RUST_LOG` syntax), which the reload swaps itself.
    fn log_filter(&mut self) -> &mut String;
    /// Names the settings that differ in `new` and take effect only after a restart.
    fn restart_only_changes(&self, new: &Self) -> Vec<&'static str>;
    /// Takes every live setting from `new`; the restart-only ones keep their running values.
    fn apply_live(&mut self, new: Self);
}

/// Declares which settings take effect only after a restart, next to the settings themselves,
/// and derives from that one list both `restart_only_changes` (what a reload cannot apply) and
/// `apply_live` (what a reload does to the running settings). Every setting not listed is live.
macro_rules! restart_only {
    ($settings:ident { $($name:ident => $($field:ident).+),* $(,)? }) => {
        impl $settings {
            /// The settings a reload cannot change, by key, in the order reported.
            pub const RESTART_ONLY: &[&str] = &[$(stringify!($name)),*];
        }

        impl $crate::config::Reloadable for $settings {
            fn log_filter(&mut self) -> &mut String {
                &mut self.log_filter
            }

            fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
                let mut changed = Vec::new();
                $(
                    if self.$($field).+ != new.$($field).+ {
                        changed.push(stringify!($name));
                    }
                )*
                changed
            }

            fn apply_live(&mut self, new: Self) {
                let running = std::mem::replace(self, new);
                $( self.$($field).+ = running.$($field).+; )*
            }
        }
    };
}
pub(crate) use restart_only;

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

/// A size as a `usize`, saturating (a cache or budget larger than memory is no limit).
fn bytes(size: u64) -> usize {
    usize::try_from(size).unwrap_or(usize::MAX)
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

/// Values given on the command line, the top layer: the clap arguments as they serialise, keyed
/// by setting name. A flag left out serialises to nothing, leaving the lower layers in force.
#[derive(Clone, Debug, Default)]
pub struct Flags(Figment);

impl Flags {
    /// The flags of `args`, a struct whose fields are named as the settings they override.
    pub fn new(args: &impl Serialize) -> Self {
        Flags(Figment::from(FlagProvider(args)))
    }
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

/// The keys a daemon accepts: the fields of its defaults. `serde_json`, unlike figment, keeps a
/// field whose default is `None` (as `null`), so such a key is known too.
fn known_keys(defaults: &impl Serialize) -> Vec<String> {
    let value = serde_json::to_value(defaults).expect("a struct of plain fields serialises");
    let object = value.as_object().expect("the defaults are a struct, so a JSON object");
    object.keys().cloned().collect()
}

/// Built-in default < file < environment < flags.
fn layered(
    defaults: impl Provider,
    file: &ConfigFile,
    env: impl Provider,
    flags: &Flags,
) -> Figment {
    let mut figment = Figment::new().merge(defaults);
    // An absent default file means "built-in defaults"; an absent `--config` file was already
    // reported by `Check::new`.
    if file.path.exists() {
        figment = figment.merge(Toml::file_exact(&file.path));
    }
    figment.merge(env).merge(flags.0.clone())
}

/// Collects problems key by key instead of stopping at the first one.
///
/// Its getters are total: a value that fails records a problem and stands in with a placeholder,
/// which [`Check::finish`] never lets out.
struct Check<'a> {
    figment: &'a Figment,
    env_prefix: &'static str,
    problems: Vec<String>,
    /// Keys with a problem, so checks across keys skip values that are only placeholders.
    failed: BTreeSet<String>,
    /// Known keys no getter has read yet: a key with a default that `load` forgot.
    unread: BTreeSet<String>,
}

impl<'a> Check<'a> {
    /// Starts a check of `figment`, refusing at once what hides every key (a missing `--config`
    /// file, a file that is not TOML), and reporting every key not in `known`.
    fn new(
        figment: &'a Figment,
        file: &ConfigFile,
        env_prefix: &'static str,
        known: &[String],
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
        let mut check = Check {
            figment,
            env_prefix,
            problems: Vec::new(),
            failed: BTreeSet::new(),
            unread: known.iter().cloned().collect(),
        };
        for key in dict.keys().filter(|key| !known.contains(key)) {
            check.problem(key, format!("unknown key; known keys are {}", known.join(", ")));
        }
        Ok(check)
    }

    fn origin(&self, key: &str) -> String {
        origin(self.figment.find_metadata(key), key, self.env_prefix)
    }

    /// Records "ORIGIN: REASON" for `key`.
    fn problem(&mut self, key: &str, reason: impl fmt::Display) {
        let origin = self.origin(key);
        self.problems.push(format!("{origin}: {reason}"));
        self.failed.insert(key.to_owned());
    }

    /// True when none of `keys` had a problem, so their values are real.
    fn valid(&self, keys: &[&str]) -> bool {
        keys.iter().all(|key| !self.failed.contains(*key))
    }

    /// The value of `key`, or `None` after recording why it has none.
    fn try_get<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.unread.remove(key);
        match self.figment.extract_inner::<T>(key) {
            Ok(value) => Some(value),
            Err(err) => {
                self.problem(key, err.kind);
                None
            }
        }
    }

    fn get<T: DeserializeOwned + Default>(&mut self, key: &str) -> T {
        self.try_get(key).unwrap_or_default()
    }

    /// A string value turned into a `T` by `parse`; `placeholder` when either step fails.
    fn parse_or<T, E: fmt::Display>(
        &mut self,
        key: &str,
        placeholder: T,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> T {
        let Some(raw) = self.try_get::<String>(key) else { return placeholder };
        parse(&raw).unwrap_or_else(|err| {
            self.problem(key, err);
            placeholder
        })
    }

    /// A humantime duration such as "100s" or "20ms".
    fn duration(&mut self, key: &str) -> Duration {
        self.parse_or(key, Duration::ZERO, |s| {
            humantime::parse_duration(s)
                .map_err(|err| format!("`{s}` is not a duration like \"100s\" or \"20ms\": {err}"))
        })
    }

    /// A duration above zero.
    fn positive_duration(&mut self, key: &str) -> Duration {
        let value = self.duration(key);
        if self.valid(&[key]) && value.is_zero() {
            self.problem(key, "must be longer than 0s");
        }
        value
    }

    /// A whole number above zero.
    fn positive<T: DeserializeOwned + Default + PartialEq>(&mut self, key: &str) -> T {
        let value = self.get::<T>(key);
        if self.valid(&[key]) && value == T::default() {
            self.problem(key, "must be at least 1");
        }
        value
    }

    /// A number within `range`.
    fn within<T>(&mut self, key: &str, range: RangeInclusive<T>) -> T
    where
        T: DeserializeOwned + Default + PartialOrd + fmt::Display,
    {
        let value = self.get::<T>(key);
        if self.valid(&[key]) && !range.contains(&value) {
            self.problem(key, format!("must be {} to {}, not {value}", range.start(), range.end()));
        }
        value
    }

    /// A size in bytes, written "16MiB", "8GiB", "512KiB" or as a plain number of bytes, from
    /// `min` to `max`.
    fn size(&mut self, key: &str, min: u64, max: u64) -> u64 {
        let Some(value) = self.try_get::<Value>(key) else { return 0 };
        let raw = match value {
            Value::Num(_, num) => num.to_u128_lossy().map(|n| n.to_string()),
            value => value.into_string(),
        };
        let parsed = raw.as_deref().map_or_else(
            || Err("expected a size such as \"16MiB\" or a number of bytes".to_owned()),
            parse_size,
        );
        match parsed {
            Ok(size) if (min..=max).contains(&size) => size,
            Ok(size) => {
                self.problem(
                    key,
                    format!("{size} bytes is outside the accepted range, {min} to {max} bytes"),
                );
                size
            }
            Err(err) => {
                self.problem(key, err);
                0
            }
        }
    }

    /// A key whose default is "unset" (`None`).
    fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        // figment drops a `None` default, so an unset key is absent rather than empty.
        if self.figment.contains(key) {
            self.try_get::<Option<T>>(key).flatten()
        } else {
            self.unread.remove(key);
            None
        }
    }

    /// A list whose every element parses as a `T`; each bad one is reported, and the list is then
    /// empty.
    fn list<T: std::str::FromStr>(&mut self, key: &str) -> Vec<T>
    where
        T::Err: fmt::Display,
    {
        let raw = self.get::<Vec<String>>(key);
        let mut parsed = Vec::with_capacity(raw.len());
        for text in &raw {
            match text.parse() {
                Ok(value) => parsed.push(value),
                Err(err) => self.problem(key, err),
            }
        }
        if parsed.len() == raw.len() { parsed } else { Vec::new() }
    }

    /// A `tracing` filter; `RUST_LOG`, when set, takes the place of the configured value.
    fn log_filter(&mut self, key: &str) -> String {
        if let Ok(rust_log) = std::env::var("RUST_LOG") {
            self.unread.remove(key);
            if let Err(err) = crate::telemetry::check_filter(&rust_log) {
                self.problems.push(format!("environment variable RUST_LOG: {err}"));
                self.failed.insert(key.to_owned());
            }
            return rust_log;
        }
        self.parse_or(key, String::new(), |s| {
            crate::telemetry::check_filter(s).map(|()| s.to_owned())
        })
    }

    /// Refuses the whole configuration if any key failed.
    fn finish(self) -> Result<(), ConfigError> {
        debug_assert!(self.unread.is_empty(), "load() never reads {:?}", self.unread);
        if self.problems.is_empty() { Ok(()) } else { Err(ConfigError { problems: self.problems }) }
    }
}

/// A file named by `key` read with `read`; `None` for "" (off) and after recording a problem.
fn tls_file<T>(
    check: &mut Check<'_>,
    key: &str,
    read: impl FnOnce(&Path) -> Result<T, String>,
) -> Option<T> {
    let path: String = check.get(key);
    if path.is_empty() {
        return None;
    }
    read(Path::new(&path)).map_err(|err| check.problem(key, err)).ok()
}

/// A certificate file and its key file, named by `cert` and `key`: both or neither.
fn tls_identity(
    check: &mut Check<'_>,
    cert: &str,
    key: &str,
) -> Option<(tls::Certificates, tls::PrivateKey)> {
    let chain = tls_file(check, cert, tls::Certificates::read);
    let private = tls_file(check, key, tls::PrivateKey::read);
    match (chain, private) {
        (Some(chain), Some(private)) => Some((chain, private)),
        (Some(_), None) if check.valid(&[key]) => {
            check.problem(key, format!("`{cert}` is set, so this must name its private key"));
            None
        }
        (None, Some(_)) if check.valid(&[cert]) => {
            check.problem(cert, format!("`{key}` is set, so this must name its certificate"));
            None
        }
        _ => None,
    }
}

/// A listener's TLS from `cert`, `key` and, when given, the `client_ca` key (mutual TLS);
/// `None` (plaintext) when the files are "".
fn server_tls(
    check: &mut Check<'_>,
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
) -> Option<tls::ServerTls> {
    let identity = tls_identity(check, cert, key);
    let ca = client_ca
        .and_then(|ca_key| Some((ca_key, tls_file(check, ca_key, tls::Certificates::read)?)));
    let Some((chain, private)) = identity else {
        if let Some((ca_key, _)) = ca
            && check.valid(&[cert, key])
        {
            check
                .problem(ca_key, format!("client certificates need TLS: set `{cert}` and `{key}`"));
        }
        return None;
    };
    tls::ServerTls::new(&chain, &private, ca.as_ref().map(|(_, ca)| ca))
        .map_err(|err| check.problem(cert, err))
        .ok()
}

/// How the proxy connects to `https://` workers: the CA file `ca` and the client certificate
/// `cert`/`key` (all optional).
fn client_tls(check: &mut Check<'_>, ca: &str, cert: &str, key: &str) -> tls::ClientTls {
    let roots = tls_file(check, ca, tls::Certificates::read);
    let identity = tls_identity(check, cert, key);
    tls::ClientTls::new(roots, identity).map_err(|err| check.problem(cert, err)).unwrap_or_default()
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

/// Checks that the documentation of a daemon's settings (its README table and its shipped file)
/// lists exactly the keys its defaults name, with those defaults.
#[cfg(test)]
mod documented {
    use figment::Provider;
    use figment::providers::{Format, Toml};
    use serde::Serialize;
    use serde_json::Value;

    /// One row of a README settings table.
    pub struct Row {
        pub key: String,
        pub environment: String,
        pub default: String,
        pub live: String,
    }

    /// The rows of the settings table under the README heading `### {heading}`.
    pub fn readme_rows(heading: &str) -> Vec<Row> {
        let readme = include_str!("../../README.md");
        let start = readme.find(&format!("\n### {heading}\n")).expect("the README has the heading");
        readme[start..]
            .lines()
            .skip_while(|line| !line.starts_with('|'))
            .take_while(|line| line.starts_with('|'))
            .skip(2)
            .filter_map(|line| {
                let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
                let key = code(cells[0])?;
                Some(Row {
                    key: key.to_owned(),
                    environment: cells[1].to_owned(),
                    default: cells[3].to_owned(),
                    live: cells[4].to_owned(),
                })
            })
            .collect()
    }

    /// The first `code` span of a table cell.
    pub fn code(cell: &str) -> Option<&str> {
        let (_, rest) = cell.split_once('`')?;
        rest.split_once('`').map(|(code, _)| code)
    }

    /// The defaults, key by key.
    pub fn default_values(defaults: &impl Serialize) -> serde_json::Map<String, Value> {
        match serde_json::to_value(defaults).expect("serialises") {
            Value::Object(map) => map,
            other => panic!("defaults are not a struct: {other}"),
        }
    }

    /// How the README writes a default: a string bare ("" when empty), anything else as TOML.
    pub fn readme_default(value: &Value) -> String {
        match value {
            Value::String(s) if s.is_empty() => "\"\"".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// The README table under `heading` names exactly the keys of `defaults`, each with its
    /// environment variable and its default, and says "no" under "live on reload" exactly for
    /// `restart_only`.
    pub fn check_readme(
        heading: &str,
        env_prefix: &str,
        defaults: &impl Serialize,
        restart_only: &[&str],
    ) {
        let defaults = default_values(defaults);
        let rows = readme_rows(heading);
        let mut documented: Vec<&str> = rows.iter().map(|row| row.key.as_str()).collect();
        documented.sort_unstable();
        let known: Vec<&str> = defaults.keys().map(String::as_str).collect();
        assert_eq!(documented, known, "README \"{heading}\" lists other keys than the defaults");
        for row in &rows {
            let key = &row.key;
            let variable = format!("`{env_prefix}{}`", key.to_uppercase());
            assert!(
                row.environment.contains(&variable),
                "README: `{key}` does not name {variable}"
            );
            match &defaults[key] {
                Value::Null => {
                    assert!(row.default.starts_with("unset"), "README: `{key}` is unset");
                }
                value => assert_eq!(
                    code(&row.default),
                    Some(readme_default(value).as_str()),
                    "README: the default of `{key}`"
                ),
            }
            let restart = restart_only.contains(&key.as_str());
            assert_eq!(row.live == "no", restart, "README: whether `{key}` is live on reload");
        }
    }

    /// The shipped file shows every key of `defaults` once, and every commented-out example is
    /// the default (a key whose default is unset shows an example value instead). Lines not
    /// commented out are what the package installs, and may differ.
    pub fn check_shipped_file(name: &str, shipped: &str, defaults: &impl Serialize) {
        let defaults = default_values(defaults);
        let mut shown = Vec::new();
        for line in shipped.lines() {
            let setting = line.strip_prefix('#').unwrap_or(line);
            let Some((key, _)) = setting.split_once(" = ") else { continue };
            if key.contains(' ') {
                continue;
            }
            shown.push(key.to_owned());
            let default =
                defaults.get(key).unwrap_or_else(|| panic!("{name} shows unknown `{key}`"));
            if line.starts_with('#') && !default.is_null() {
                let parsed = Toml::string(setting).data().expect("an example line is TOML");
                let value = parsed.values().next().and_then(|dict| dict.get(key)).expect("parsed");
                let value = serde_json::to_value(value).expect("serialises");
                assert_eq!(&value, default, "{name}: the example of `{key}` is not its default");
            }
        }
        shown.sort_unstable();
        let known: Vec<&String> = defaults.keys().collect();
        assert_eq!(
            shown.iter().collect::<Vec<_>>(),
            known,
            "{name} shows other keys than the defaults"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[derive(Serialize)]
    struct Defaults {
        port: u16,
        metrics_port: Option<u16>,
        workers: Vec<String>,
    }

    #[test]
    fn known_keys_are_the_fields_of_the_defaults_even_an_unset_one() {
        let defaults = Defaults { port: 1, metrics_port: None, workers: Vec::new() };
        assert_eq!(known_keys(&defaults), ["metrics_port", "port", "workers"]);
    }
}
