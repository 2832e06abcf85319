//! Test support: the harness shared with the examples (`dev/harness`: launching daemons,
//! readiness, ports from `/proc`, requests, sample inputs, stand-in workers), re-exported whole so
//! that tests name it `crate::support::…`, and what only the tests need beside it.

pub use harness::*;

pub mod hostile;
pub mod otlp;
