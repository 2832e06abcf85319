//! `minedctl`: parse the command line and make one call on the proxy's control socket.

use std::process::ExitCode;

use clap::Parser;
use miden_proving_service::control::client::{self, CtlCli};

fn main() -> ExitCode {
    let cli = CtlCli::parse();
    client::run(&cli.socket, &cli.command)
}
