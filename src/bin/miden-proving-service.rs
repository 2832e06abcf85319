//! `miden-proving-service`: parse the command line and hand over to the daemon or the control
//! client.

use std::process::ExitCode;

use clap::Parser;
use miden_proving_service::cli::{Cli, Command, ControlArgs};
use miden_proving_service::control::client::{self, CtlCommand};
use miden_proving_service::{daemon, worker};

fn main() -> ExitCode {
    miden_proving_service::cpu::exec_fast_build_if_it_runs_here();
    match Cli::parse().command {
        Command::StartWorker(args) => daemon::worker::main(&args.config_source()),
        Command::StartProxy(args) => daemon::proxy::main(&args.config_source()),
        Command::AddWorkers(args) => control(args, |workers| CtlCommand::AddWorker { workers }),
        Command::RemoveWorkers(args) => {
            control(args, |workers| CtlCommand::RemoveWorker { workers })
        }
        Command::ProveJob(args) => {
            worker::job::child_main(args.prover_type, args.memory_limit, args.parent)
        }
    }
}

fn control(args: ControlArgs, command: impl FnOnce(Vec<String>) -> CtlCommand) -> ExitCode {
    if let Err(message) = args.check() {
        eprintln!("miden-proving-service: {message}");
        return ExitCode::from(2);
    }
    client::run(&args.socket, &command(args.workers))
}
