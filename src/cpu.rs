//! Which build of the service this is; the check that this CPU can run it is in `src/cpu_check.c`.
//!
//! `scripts/build-fast.sh` compiles the prover for `x86-64-v3` (AVX2, BMI1/2, FMA …): about
//! twice as fast, but an older CPU would die of SIGILL. Such builds link `src/cpu_check.c`
//! (compiled for baseline x86-64 by `build.rs`), whose constructor runs before `main` and refuses
//! to start on a CPU that lacks a feature the build uses, naming it. The check cannot be Rust:
//! Rust compiled with AVX may use AVX instructions in its very first line (a SIGILL measured under
//! `qemu-x86_64 -cpu Nehalem`), and `is_x86_feature_detected!` folds to `true` for a feature
//! enabled at compile time.

/// The `-C target-cpu` this binary was compiled for: "generic", "x86-64-v3" or "native".
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
