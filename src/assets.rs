//! Man pages and shell completions for both commands, generated from the same clap definitions
//! the binaries parse, so they cannot drift. `examples/gen_assets.rs` writes them for packaging.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::control::client::CtlCli;

/// Writes `man/*.1` (one page per command and subcommand) and `completions/` for bash, zsh and
/// fish under `dir`; returns the files written.
pub fn write(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut written = Vec::new();
    for command in [Cli::command(), CtlCli::command()] {
        written.extend(man_pages(command.clone(), &man)?);
        let name = command.get_name().to_owned();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            written.push(clap_complete::generate_to(
                shell,
                &mut command.clone(),
                &name,
                &completions,
            )?);
        }
    }
    Ok(written)
}

/// `NAME.1` for the command and `NAME-SUB.1` for each subcommand.
fn man_pages(command: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut command = command;
    command.build();
    let mut written = Vec::new();
    let name = command.get_name().to_owned();
    let version = command.get_version().unwrap_or_default().to_owned();
    let mut pages = vec![(name.clone(), command.clone())];
    // Hidden subcommands (`prove-job`, the worker's prover process) are not for operators.
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help" && !s.is_hide_set()) {
        let page = format!("{name}-{}", sub.get_name());
        pages.push((page.clone(), sub.clone().name(page).version(version.clone())));
    }
    for (page, command) in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(command).render(&mut roff)?;
        let path = dir.join(format!("{page}.1"));
        std::fs::write(&path, roff)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|err| panic!("{name}: {err}"))
    }

    #[test]
    fn man_pages_and_completions_cover_both_commands_and_their_subcommands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = super::write(dir.path()).expect("write assets");
        assert_eq!(written.len(), 5 + 6 + 6, "{written:?}"); // 5 + 6 pages, 2 × 3 shells

        let page = read(dir.path(), "man/minedctl.1");
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "roff: {page}");
        assert!(page.contains(".TH minedctl 1") && page.contains("add\\-worker"), "{page}");
        let sub = read(dir.path(), "man/minedctl-add-worker.1");
        assert!(sub.contains(".TH minedctl-add-worker 1") && sub.contains("host:port"), "{sub}");
        let daemon = read(dir.path(), "man/miden-proving-service-start-proxy.1");
        assert!(daemon.contains("\\-\\-status\\-port"), "{daemon}");

        let bash = read(dir.path(), "completions/minedctl.bash");
        assert!(bash.contains("remove-worker") && bash.contains("--socket"), "{bash}");
        assert!(read(dir.path(), "completions/_miden-proving-service").contains("start-worker"));
        assert!(read(dir.path(), "completions/minedctl.fish").contains("add-worker"));
    }
}
