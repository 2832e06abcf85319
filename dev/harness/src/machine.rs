//! The machine's side of a benchmark: its CPU wake-up latency.
//!
//! An idle CPU halts, and waking it for the next packet takes time that no process can save.
//! Linux's PM QoS limit (`/dev/cpu_dma_latency`, what tuned's `latency-performance` profile
//! holds) keeps idle CPUs in the idle states that wake within the limit — at 0 µs, polling — for
//! as long as a process holds the file open with the limit written to it. On this project's VMs
//! (`haltpoll` cpuidle, no halt polling) it moved no figure of `bench_proxy fake`
//! (BENCHMARKS.md); the knob stays for machines where halting is the cost.

use std::fs::File;
use std::io::Write;

/// The variable that names the limit in microseconds.
pub const CPU_LATENCY_VAR: &str = "BENCH_CPU_LATENCY_US";

/// When [`CPU_LATENCY_VAR`] is set, holds the machine's CPU wake-up latency limit at that many
/// microseconds until the returned file is dropped (root), and says so on stderr; `None` when it
/// is not set. Panics when it is set but cannot be held: a benchmark must not report figures of
/// a machine other than the one it says.
pub fn hold_cpu_latency_from_env() -> Option<File> {
    let micros: i32 = std::env::var(CPU_LATENCY_VAR)
        .ok()?
        .parse()
        .unwrap_or_else(|err| panic!("{CPU_LATENCY_VAR}: microseconds: {err}"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .unwrap_or_else(|err| panic!("{CPU_LATENCY_VAR}: /dev/cpu_dma_latency: {err}"));
    file.write_all(&micros.to_ne_bytes()).expect("write the latency limit");
    eprintln!("holding the CPU wake-up latency limit (/dev/cpu_dma_latency) at {micros} µs");
    Some(file)
}
