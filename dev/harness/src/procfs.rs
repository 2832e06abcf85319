//! What the kernel says about a daemon under test, from `/proc`: the one place the harness
//! learns a daemon's TCP ports.

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
