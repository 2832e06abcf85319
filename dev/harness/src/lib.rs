//! The harness behind the integration tests (`tests/it`) and the examples: it starts the real
//! daemons as processes on `127.0.0.1:0`, waits for `READY=1` on a real `NOTIFY_SOCKET`, learns
//! each one's ports from `/proc`, and talks gRPC to them. A dev-dependency crate, compiled once for
//! the test binary and every example; the tests add what only they need in `tests/it/support/`.
//!
//! - [`certs`]: a CA and the certificates it signs, made with `openssl`.
//! - [`daemon`]: [`Launch`] → [`Daemon`] / [`Proxy`], the binaries under test, a clean environment.
//! - [`notify`]: the `NOTIFY_SOCKET` a daemon reports readiness and status to.
//! - [`procfs`]: the ports a process listens on, from `/proc`.
//! - [`http`]: a plain HTTP/1.1 GET for the proxy's status and metrics.
//! - [`requests`]: proof requests and the verification of a transaction proof.
//! - [`fixtures`]: real Miden inputs from `MockChain`, and proving in this process.
//! - [`standin`]: STAND-IN workers that answer with dummy proofs, to load the proxy.
//! - [`rig`]: hosts made of network namespaces, with link faults and a DNS server.
//! - [`machine`]: the CPU wake-up latency limit a benchmark may hold.

pub mod certs;
pub mod daemon;
pub mod fixtures;
pub mod http;
pub mod machine;
pub mod notify;
pub mod procfs;
pub mod requests;
pub mod rig;
pub mod standin;

pub use daemon::{Daemon, Launch, Proxy, START_TIMEOUT, bin, clean_env, example, minedctl};
pub use http::http_get;
pub use notify::{NotifyMessage, NotifySocket};
pub use procfs::{Seen, alive, children, listening_addrs, parent};
