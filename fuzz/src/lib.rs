//! The decoders the worker's prover processes run (`src/prover/decode.rs` of the service,
//! compiled here from the same files), for the fuzz targets.
#![feature(alloc_error_hook)]

#[path = "../../src/kind.rs"]
mod kind;
pub mod prover;

pub use kind::ProofKind;

use std::alloc::{GlobalAlloc, Layout, System};

/// The prover process's address-space limit, as the fuzz targets see it: an allocation larger
/// than this fails. In the prover process such a failure aborts it before the payload decoded,
/// and the worker answers `INVALID_ARGUMENT` (Miden's `MerkleStore` reserves a count read as a
/// `u64`, which no reader can bound). Here an allocation error hook turns the failure into a panic
/// that [`prover::decode`] catches as a decoding error, so the campaign goes on past a bomb that
/// is already contained. 2 GiB: a quarter of the default
/// `prover_memory_limit`; memory a decode really uses is bounded by libFuzzer's `-rss_limit_mb`.
pub const ALLOCATION_LIMIT: usize = 2 << 30;

struct Capped;

// SAFETY: forwards to the system allocator, or fails (null) as an allocator may.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// Decodes `data` as a prover process would for `kind`; the result is dropped. A crash, an abort,
/// memory over libFuzzer's `-rss_limit_mb`, a leak or a hang here is a finding.
///
/// A panic the decoder catches (reported as a decoding error, as in the prover process) is not:
/// libfuzzer-sys's hook, which aborts on every panic, is replaced by Rust's default one, which
/// prints `panicked at FILE:LINE` (`scripts/fuzz.sh` lists those sites). A panic that escapes
/// still aborts, in the fuzz target's own `catch_unwind`.
pub fn decode(kind: ProofKind, data: &[u8]) {
    static HOOKS: std::sync::Once = std::sync::Once::new();
    HOOKS.call_once(|| {
        drop(std::panic::take_hook());
        std::alloc::set_alloc_error_hook(|layout| {
            panic!("memory allocation of {} bytes failed", layout.size())
        });
    });
    let _ = prover::decode(kind, data);
}
