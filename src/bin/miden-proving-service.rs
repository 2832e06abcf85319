//! `miden-proving-service`: parse the command line and hand over to the daemon.

use std::process::ExitCode;

use clap::Parser;
use miden_proving_service::cli::{Cli, Command};
use miden_proving_service::{proxy, worker};

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::StartWorker(args) => worker::daemon::main(&args.config_source()),
        Command::StartProxy(args) => proxy::daemon::main(&args.config_source()),
    }
}
