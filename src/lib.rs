//! The Miden proving service: turns Miden transactions, batches and blocks into proofs on demand.
//!
//! How a request flows through the worker:
//! `bin/miden-proving-service` parses flags ([`cli`]) and loads layered settings ([`config`]) →
//! [`daemon`] starts logging ([`telemetry`]), binds, reports readiness ([`systemd`]) and
//! handles signals → [`worker`] admits one `Prove` call at a time (from its headers) and hands it to
//! a prover process of its own ([`worker::job`]) → [`prover`], the only module that names Miden
//! types, decodes the payload (through a reader that refuses impossible lengths) and proves it.
//!
//! The proxy ([`proxy`]) queues requests and spreads them over workers; [`control`] lets an
//! operator change its workers at run time (`minedctl`) over a root-only Unix socket.
//!
//! - [`proto`]: generated gRPC code of the wire contract (`proto/remote_prover.proto`).
//! - [`wire`]: the wire's fixed numbers and texts (paths, message bounds, HTTP/2 windows).
//! - [`tls`]: TLS on the listeners and to `https://` workers, from PEM files.
//! - [`ProofKind`]: transaction, batch or block.

pub mod assets;
pub mod cli;
pub mod config;
pub mod control;
pub mod cpu;
pub mod daemon;
mod kind;
pub mod proto;
pub mod prover;
pub mod proxy;
pub mod share;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod wire;
pub mod worker;

pub use kind::{ProofKind, UnknownProofKind};
