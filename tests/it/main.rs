//! Integration tests: the real daemons as processes, real Miden proofs, real gRPC clients, a real
//! notify socket and a real journald. One test binary, because each links the whole Miden stack.

mod cache;
mod clients;
mod control;
mod fast;
mod hostile;
mod proxy;
mod support;
mod worker;
