//! Integration tests: the real daemons as processes, real Miden proofs, real gRPC clients, a real
//! notify socket and a real journald. One test binary, because each links the whole Miden stack.

// A test is a scenario read from top to bottom (start, act, check each effect); the 60-line bound
// is for the product's code in src/.
#![allow(clippy::too_many_lines)]

mod cache;
mod clients;
mod control;
mod fast;
mod fleet;
mod hostile;
mod proxy;
mod support;
mod tls;
mod worker;
