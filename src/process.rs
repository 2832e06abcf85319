//! What both daemons' entry points share: load the configuration (exit 78 when it is broken,
//! before anything is bound), start the async runtime, run, and turn the outcome into an exit
//! status with the whole cause chain on stderr and in the log.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::ConfigError;

/// Exit status for an invalid configuration (`EX_CONFIG` from sysexits.h), so a unit can set
/// `RestartPreventExitStatus=78` instead of restarting into the same error.
pub const EXIT_CONFIG: u8 = 78;

/// Runs a daemon named `name` (for messages) with the settings `load` returns.
pub fn run_daemon<S, E, F>(
    name: &str,
    load: Result<S, ConfigError>,
    run: impl FnOnce(S) -> F,
) -> ExitCode
where
    E: std::error::Error,
    F: Future<Output = Result<(), E>>,
{
    let settings = match load {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match run(settings).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                let message = error_chain(&err);
                tracing::error!("{message}");
                eprintln!("{name}: {message}");
                ExitCode::FAILURE
            }
        }
    });
    // A proof abandoned after the grace period must not hold the process open.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// "outer: cause: root cause", so the client and the log see why, not only what.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Makes room for `needed` descriptors, what `settings` (named in the warning) may open: raises
/// the soft `RLIMIT_NOFILE` to the hard one (systemd's default soft limit is 1024; the units set
/// both higher) and warns when even that is short, since running out means refused connections,
/// not a crash (accept errors pause accepting). Returns whether the limit leaves that room.
pub fn descriptor_headroom(needed: u64, settings: &str) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return true };
    let mut limit = soft;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        tracing::info!(
            from = soft,
            to = hard,
            "raised the descriptor limit (RLIMIT_NOFILE) to its maximum"
        );
        limit = hard;
    }
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "{settings} need more descriptors than RLIMIT_NOFILE allows; lower them or raise \
             LimitNOFILE= in the unit"
        );
    }
    limit >= needed
}
