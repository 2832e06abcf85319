//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed on the build machine) and
//! generates the tonic client and server code plus the descriptor set served by gRPC reflection.
//!
//! Also names the build: `SERVICE_BUILD_CPU` is the `-C target-cpu` it was compiled for
//! ("generic" when none, "x86-64-v3" for `scripts/build-fast.sh`), and `SERVICE_BUILD_FEATURES`
//! lists the CPU features the compiler was allowed to use, which the binary checks for at start.
//! (Not `MPS_*`: cargo also sets these variables when it runs tests, where the proxy would read
//! them as configuration.)

use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=proto");
    let rustflags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let mut target_cpu = None;
    let mut flags = rustflags.split('\x1f').peekable();
    while let Some(flag) = flags.next() {
        let value = match flag {
            "-C" | "--codegen" => flags.peek().copied().unwrap_or_default(),
            other => other.strip_prefix("-C").unwrap_or_default(),
        };
        if let Some(cpu) = value.strip_prefix("target-cpu=") {
            target_cpu = Some(cpu.to_owned());
        }
    }
    println!("cargo::rustc-env=SERVICE_BUILD_CPU={}", target_cpu.as_deref().unwrap_or("generic"));
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    println!("cargo::rustc-env=SERVICE_BUILD_FEATURES={features}");
    let build = target_cpu.as_deref().unwrap_or("generic");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64")
        && features.split(',').any(|f| f == "avx")
    {
        cpu_check(build, &features)?;
    }
    let descriptors = protox::compile(["remote_prover.proto"], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("remote_prover_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// Compiles `src/cpu_check.c` for baseline x86-64 and links it into every binary of this build:
/// its constructor refuses to start on a CPU that lacks one of `features` (see the file).
fn cpu_check(build: &str, features: &str) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=src/cpu_check.c");
    let object = PathBuf::from(std::env::var("OUT_DIR")?).join("cpu_check.o");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = std::process::Command::new(&compiler)
        .args(["-c", "-O2", "-march=x86-64", "-mtune=generic", "-fPIC", "-Wall", "-Werror"])
        .arg(format!("-DMPS_BUILD=\"{build}\""))
        .arg(format!("-DMPS_REQUIRED=\"{features}\""))
        .arg("src/cpu_check.c")
        .arg("-o")
        .arg(&object)
        .status()
        .map_err(|err| {
            format!("cannot run the C compiler `{compiler}` for src/cpu_check.c: {err}")
        })?;
    if !status.success() {
        return Err(format!("`{compiler}` failed on src/cpu_check.c ({status})").into());
    }
    println!("cargo::rustc-link-arg={}", object.display());
    Ok(())
}
