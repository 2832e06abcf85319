//! Which build of the service this is; the check that this CPU can run it is in `src/cpu_check.c`.
//!
//! `scripts/build-fast.sh` compiles the prover for `x86-64-v3` (AVX2) by default: about twice
//! as fast (BENCHMARKS.md), but an older CPU would die of SIGILL. Such builds link `src/cpu_check.c`
//! (compiled for baseline x86-64 by `build.rs`), whose constructor runs before `main` and refuses
//! to start on a CPU that lacks a feature the build uses, naming it. The check cannot be Rust:
//! Rust compiled with AVX may use AVX instructions in its very first line (a SIGILL measured under
//! `qemu-x86_64 -cpu Nehalem`), and `is_x86_feature_detected!` folds to `true` for a feature
//! enabled at compile time.

/// The `-C target-cpu` this binary was compiled for: "generic", "x86-64-v4", "x86-64-v3" or
/// "native".
pub const BUILD: &str = env!("SERVICE_BUILD_CPU");

/// The version with the build: "0.1.0" for the generic build, "0.1.0+x86-64-v3" otherwise
/// (semver build metadata, so version checks that compare major.minor are unaffected).
pub fn version() -> String {
    if BUILD == "generic" {
        env!("CARGO_PKG_VERSION").to_owned()
    } else {
        format!("{}+{BUILD}", env!("CARGO_PKG_VERSION"))
    }
}

/// `--version` text: "0.1.0 (x86-64-v3 build)".
pub const LONG_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("SERVICE_BUILD_CPU"), " build)");

/// The CPU features this binary was compiled to use, as rustc names them.
pub fn required() -> Vec<&'static str> {
    env!("SERVICE_BUILD_FEATURES").split(',').filter(|f| !f.is_empty()).collect()
}

/// The build the packages carry beside the generic one: `x86-64-v3` (AVX2, x86 servers of the
/// last ten years), 2.1× as fast on a transaction proof; `x86-64-v4` adds 8 % on a CPU with
/// AVX-512 (BENCHMARKS.md), too little to carry a third build of the prover.
pub const FAST_BUILD: &str = "x86-64-v3";

/// Set to `generic` to keep the generic build even where the fast one could run.
pub const BUILD_ENV: &str = "MIDEN_PROVER_BUILD";

/// Where the fast build lives relative to the generic binary: `/usr/bin/miden-proving-service`
/// → `/usr/lib/miden-proving-service/miden-proving-service.x86-64-v3`.
pub fn fast_build_beside(exe: &std::path::Path) -> Option<std::path::PathBuf> {
    let prefix = exe.parent()?.parent()?;
    let name = exe.file_name()?.to_str()?;
    Some(prefix.join("lib").join(name).join(format!("{name}.{FAST_BUILD}")))
}

/// The features of `x86-64-v3` beyond the baseline, as rustc's `--print cfg` lists them. The one
/// list of them in the repository: CI and the package tests ask the fast build itself whether it
/// runs (it refuses to start without a feature it was compiled for, `src/cpu_check.c`).
#[cfg(target_arch = "x86_64")]
fn runs_fast_build() -> bool {
    macro_rules! all_detected {
        ($($feature:tt),*) => { true $(&& std::is_x86_feature_detected!($feature))* };
    }
    all_detected!(
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "cmpxchg16b",
        "f16c",
        "fma",
        "lzcnt",
        "movbe",
        "popcnt",
        "sse3",
        "sse4.1",
        "sse4.2",
        "ssse3",
        "xsave"
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn runs_fast_build() -> bool {
    false
}

/// The generic build's first step: when the packages' fast build sits beside this binary, the
/// CPU has every feature it was compiled for, and `MIDEN_PROVER_BUILD` is not `generic`, replace
/// this process by it (same pid, arguments and environment, so systemd's `NotifyAccess=main` and
/// watchdog still address it). Returns, and the generic build runs, in every other case.
pub fn exec_fast_build_if_it_runs_here() {
    use std::os::unix::process::CommandExt;

    if BUILD != "generic" || std::env::var(BUILD_ENV).is_ok_and(|build| build == "generic") {
        return;
    }
    let Some(fast) = std::env::current_exe().ok().as_deref().and_then(fast_build_beside) else {
        return;
    };
    if !fast.is_file() || !runs_fast_build() {
        return;
    }
    let mut args = std::env::args_os();
    let program_name = args.next().unwrap_or_else(|| fast.clone().into_os_string());
    let err = std::process::Command::new(&fast).arg0(program_name).args(args).exec();
    eprintln!(
        "miden-proving-service: cannot start the {FAST_BUILD} build {}: {err}; running the \
         generic build (set {BUILD_ENV}=generic to skip this attempt)",
        fast.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_runs_the_build_that_is_testing_it() {
        if BUILD == "generic" {
            assert_eq!(version(), env!("CARGO_PKG_VERSION"));
        } else {
            assert!(required().contains(&"avx2"), "{:?}", required());
            assert_eq!(version(), format!("{}+{BUILD}", env!("CARGO_PKG_VERSION")));
        }
    }
}
