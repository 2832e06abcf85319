//! What the kernel says about a daemon under test, from `/proc`: the one place the harness
//! learns a daemon's TCP ports, and where a worker's prover processes are found.

use std::collections::HashSet;
use std::net::SocketAddr;

/// The TCP addresses process `pid` listens on, read from `/proc` (its socket inodes matched
/// against the kernel's TCP tables): the port is discovered, not guessed or parsed from logs.
pub fn listening_addrs(pid: i32) -> Vec<SocketAddr> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read the daemon's fds").flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut addrs = Vec::new();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("tcp table");
    for row in table.lines().skip(1) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        // cols: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
            let (ip, port) = cols[1].split_once(':').expect("ip:port");
            let ip = u32::from_str_radix(ip, 16).expect("hex ip");
            let port = u16::from_str_radix(port, 16).expect("hex port");
            addrs.push(SocketAddr::from((ip.to_le_bytes(), port)));
        }
    }
    addrs.sort();
    addrs
}

/// The child processes of `pid` (over all its threads).
pub fn children(pid: i32) -> HashSet<i32> {
    let mut found = HashSet::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(list.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    found
}

/// True while `pid` exists and is not a zombie (an orphan's zombie waits for whoever reaps it).
pub fn alive(pid: i32) -> bool {
    stat_after_name(pid).is_some_and(|rest| !rest.starts_with('Z'))
}

/// The parent of `pid`, while it exists (a zombie included).
pub fn parent(pid: i32) -> Option<i32> {
    stat_after_name(pid)?.split_whitespace().nth(1)?.parse().ok()
}

/// A process as seen at one moment: its pid and the time it started. A test that asks later
/// whether the process is gone must not take for it a new process the kernel gave the same pid
/// since (pids wrap at `pid_max`, 32,768 on these machines, and threads take them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Seen {
    /// The pid it had.
    pub pid: i32,
    /// Its start time (clock ticks after boot); `None` when it was already gone.
    started: Option<u64>,
}

impl Seen {
    /// Process `pid` as it is now.
    pub fn now(pid: i32) -> Seen {
        Seen { pid, started: stat_after_name(pid).as_deref().and_then(start_time) }
    }

    /// Its `/proc/PID/stat` after the name, read once, while the pid is still this process's.
    fn stat(&self) -> Option<String> {
        let rest = stat_after_name(self.pid)?;
        (self.started.is_some() && start_time(&rest) == self.started).then_some(rest)
    }

    /// The same process is still running (not a zombie).
    pub fn alive(&self) -> bool {
        self.stat().is_some_and(|rest| !rest.starts_with('Z'))
    }

    /// Its parent's pid, while the same process is there (running or a zombie).
    pub fn parent(&self) -> Option<i32> {
        self.stat()?.split_whitespace().nth(1)?.parse().ok()
    }
}

/// When a process started, from its `/proc/PID/stat` after the name: the file's 22nd field.
fn start_time(after_name: &str) -> Option<u64> {
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// `/proc/PID/stat` after the `(name) `: the state, then the parent's pid, and so on.
/// CPU seconds of a process (`/proc/PID/stat`; clock ticks are 100 Hz on Linux): its own, and
/// its reaped children's.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
    pub children_user: f64,
    pub children_system: f64,
}

impl CpuTimes {
    /// Of `pid`, which must exist.
    pub fn of(pid: i32) -> CpuTimes {
        let stat = stat_after_name(pid).expect("the process's /proc stat");
        let ticks: Vec<f64> = stat
            .split_whitespace()
            .skip(11)
            .take(4)
            .map(|f| f.parse::<f64>().expect("clock ticks") / 100.0)
            .collect();
        CpuTimes { user: ticks[0], system: ticks[1], children_user: ticks[2], children_system: ticks[3] }
    }

    /// Of this process.
    pub fn own() -> CpuTimes {
        CpuTimes::of(i32::try_from(std::process::id()).expect("a pid fits i32"))
    }

    /// Its own user and system seconds.
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// Its own and its reaped children's, user and system.
    pub fn with_children(&self) -> f64 {
        self.total() + self.children_user + self.children_system
    }
}

fn stat_after_name(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(") ")?.1.to_owned())
}
