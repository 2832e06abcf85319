//! Workers added at run time (`minedctl add-worker`), kept across restarts in one small file
//! (`state_file`, under the unit's `StateDirectory=`).
//!
//! The file is the list the proxy had, never a shorter one: it is written whole to a temporary
//! file, synced and renamed over the old one, and it ends with an end line, so a file cut short
//! (a full disk, an edit gone wrong) reads as damaged rather than as fewer workers. A damaged file
//! is renamed aside, reported, and the proxy starts with its configured workers. The configured
//! workers are not in it: the configuration stays their only source.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use super::pool::{Origin, WorkerPool};
use crate::config::WorkerAddress;

const HEADER: &str =
    "# miden-prover-proxy: workers added at run time; the proxy rewrites this file";
const END: &str = "# end";

/// The file's text for `workers`.
fn render(workers: &[WorkerAddress]) -> String {
    let mut text = String::from(HEADER);
    text.push('\n');
    for worker in workers {
        text.push_str(worker.as_str());
        text.push('\n');
    }
    text.push_str(END);
    text.push('\n');
    text
}

/// The workers a file lists, or what is wrong with it.
fn parse(text: &str) -> Result<Vec<WorkerAddress>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("the first line is not the proxy's header".to_owned());
    }
    let mut workers = Vec::new();
    let mut number = 1;
    while let Some(line) = lines.next() {
        number += 1;
        if line == END {
            if lines.next().is_some() {
                return Err(format!("text follows the end line (line {number})"));
            }
            if !text.ends_with('\n') {
                break;
            }
            return Ok(workers);
        }
        workers.push(line.parse().map_err(|err| format!("line {number}: {err}"))?);
    }
    Err("it is cut short (no end line)".to_owned())
}

/// The workers saved at `path`; `Ok(None)` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<Vec<WorkerAddress>>, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_owned())?;
            parse(&text).map(Some)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("it cannot be read: {err}")),
    }
}

/// Replaces the file at `path` with `workers`, atomically: a reader (or a crash) sees the old
/// list or the new one.
pub fn save(path: &Path, workers: &[WorkerAddress]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(render(workers).as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Renames a damaged file to `PATH.damaged-UNIXSECONDS`, where an operator can look at it.
pub fn keep_aside(path: &Path) -> std::io::Result<PathBuf> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{seconds}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// Adds the workers saved at `path` to `pool` (as run-time ones). A damaged file is kept aside
/// and reported; it never stops the proxy.
pub fn restore(pool: &WorkerPool, path: &Path) {
    let workers = match load(path) {
        Ok(Some(workers)) => workers,
        Ok(None) => return,
        Err(problem) => {
            match keep_aside(path) {
                Ok(aside) => warn!(
                    file = %path.display(),
                    kept_as = %aside.display(),
                    "the state file is damaged ({problem}); it was kept aside and the proxy \
                     starts with its configured workers only: add the others again with \
                     `minedctl add-worker`"
                ),
                Err(err) => warn!(
                    file = %path.display(),
                    "the state file is damaged ({problem}) and cannot be kept aside ({err}); \
                     the proxy starts with its configured workers only"
                ),
            }
            return;
        }
    };
    let mut restored = 0;
    for address in &workers {
        match pool.add(address, Origin::Runtime) {
            Ok(true) => restored += 1,
            Ok(false) => {}
            Err(err) => warn!(worker = %address, "a worker added at run time not restored: {err}"),
        }
    }
    info!(
        file = %path.display(),
        workers = %workers.iter().map(WorkerAddress::as_str).collect::<Vec<_>>().join(", "),
        "restored {restored} workers added at run time"
    );
}

/// Rewrites the file at `path` whenever the run-time workers change, until `stopped`; a write
/// that fails is reported and tried again at the next change and at the stop.
pub async fn keep(
    pool: Arc<WorkerPool>,
    path: PathBuf,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut changed = pool.subscribe();
    let mut saved = load(&path).ok().flatten().unwrap_or_default();
    loop {
        let now = pool.runtime_workers();
        if now != saved {
            match save(&path, &now) {
                Ok(()) => saved = now,
                Err(err) => warn!(
                    file = %path.display(),
                    "cannot save the workers added at run time ({err}); they will be lost at \
                     the next restart unless a later write succeeds"
                ),
            }
        }
        if *stopped.borrow() {
            return;
        }
        tokio::select! {
            result = changed.changed() => if result.is_err() { return },
            _ = stopped.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_list_reads_back_and_every_cut_of_it_is_damaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("workers");
        let workers: Vec<WorkerAddress> =
            ["127.0.0.1:50053", "[::1]:50054"].map(|a| a.parse().expect("valid")).to_vec();
        save(&path, &workers).expect("save");
        assert_eq!(load(&path).expect("valid"), Some(workers.clone()));
        assert!(!dir.path().join("workers.new").exists());
        let text = render(&workers);
        for cut in 0..text.len() {
            assert!(parse(&text[..cut]).is_err(), "a file cut at {cut} bytes read as a list");
        }
        assert!(parse(&render(&[])).expect("an empty list").is_empty());
        let bad = text.replace("[::1]:50054", "not an address");
        assert!(parse(&bad).expect_err("bad line").starts_with("line 3:"), "{bad}");
        assert!(parse(&format!("{text}more\n")).is_err());
    }

    #[test]
    fn a_damaged_file_is_kept_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("workers");
        std::fs::write(&path, "127.0.0.1:1\n").expect("write");
        let aside = keep_aside(&path).expect("rename");
        assert!(!path.exists());
        assert_eq!(std::fs::read_to_string(aside).expect("kept"), "127.0.0.1:1\n");
        assert_eq!(load(&path).expect("absent"), None);
    }
}
