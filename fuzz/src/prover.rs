//! The service's payload decoding (`src/prover/decode.rs` and its reader), compiled from the same
//! files as the worker's prover processes run them, without the provers.

// A job's input is read only by the provers, which are not compiled here.
#[allow(dead_code)]
#[path = "../../src/prover/decode.rs"]
mod decode;
#[path = "../../src/prover/reader.rs"]
pub mod reader;

pub use decode::{Job, ProveError, decode, input_name};
