//! A real `NOTIFY_SOCKET` for the daemons under test: readiness (`READY=1`) and state
//! (`STATUS=…`) arrive as events the harness waits on, never as sleeps.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, setsockopt, sockopt};

/// One datagram received on the notify socket.
#[derive(Clone, Debug)]
pub struct NotifyMessage {
    /// Sender pid (from `SCM_CREDENTIALS`).
    pub pid: i32,
    /// The datagram, e.g. "READY=1\nSTATUS=idle".
    pub text: String,
}

/// A real `NOTIFY_SOCKET`: a datagram socket with `SO_PASSCRED`, read by a background thread.
pub struct NotifySocket {
    /// The path to put in `NOTIFY_SOCKET`.
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<NotifyMessage>>>,
    changed: tokio::sync::watch::Receiver<usize>,
}

impl NotifySocket {
    /// Binds `dir/notify.sock`.
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = tokio::sync::watch::channel(0usize);
        let store = Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<UnixAddr>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                ) else {
                    return;
                };
                let mut pid = 0;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmCredentials(creds) = c {
                            pid = creds.pid();
                        }
                    }
                }
                let len = msg.bytes;
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let count = {
                    let mut all = store.lock().expect("notify store");
                    all.push(NotifyMessage { pid, text });
                    all.len()
                };
                if tx.send(count).is_err() {
                    return;
                }
            }
        });
        NotifySocket { path, messages, changed }
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<NotifyMessage> {
        self.messages.lock().expect("notify store").clone()
    }

    /// Waits for a message with a line equal to `line` (e.g. "READY=1"), counting only messages
    /// after the first `skip`; returns its index.
    pub async fn wait_for_line(&mut self, line: &str, skip: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(index) = self
                .messages()
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, m)| m.text.lines().any(|l| l == line))
                .map(|(i, _)| i)
            {
                return index;
            }
            let changed = tokio::time::timeout_at(deadline, self.changed.changed()).await;
            assert!(changed.is_ok(), "no `{line}` within {timeout:?}; got: {:?}", self.messages());
        }
    }

    /// Waits until the current status (the last `STATUS=` line sent) starts with `prefix`. An
    /// earlier status that matched does not count: "queue 0/1" from before a request was queued
    /// is not "queue 0/1" after it left.
    pub async fn wait_for_status(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.messages().iter().rev().find_map(|m| {
                m.text.lines().find_map(|l| l.strip_prefix("STATUS=")).map(str::to_owned)
            });
            if let Some(status) = current.filter(|s| s.starts_with(prefix)) {
                return status;
            }
            let changed = tokio::time::timeout_at(deadline, self.changed.changed()).await;
            assert!(
                changed.is_ok(),
                "no STATUS={prefix}… in {timeout:?}; got: {:?}",
                self.messages()
            );
        }
    }
}
