//! The control socket: root-only by construction and by check.
//!
//! By construction: its directory is made 0700 when missing (systemd's `RuntimeDirectory=` does
//! the same), and the socket is created under a temporary name, set to 0600 and only then renamed
//! into place, so it is never reachable with looser modes. By check: every accepted connection's
//! peer credentials (`SO_PEERCRED`) must name uid 0 or the daemon's own uid, whatever the file
//! modes say; anyone else is disconnected before a byte of D-Bus is read, and the refusal logged.
//! D-Bus's own `EXTERNAL` authentication only proves who the peer is; it restricts nothing.

use std::fs::{self, DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::Control;
use super::dbus::{Interface, OBJECT_PATH};

/// Why the control socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Its directory is missing and cannot be made.
    #[error(
        "cannot create {path}, the control socket's directory (setting `control_socket`; \"\" \
         turns the socket off)"
    )]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A live socket is already there.
    #[error("another process listens on the control socket {0}; is another proxy running?")]
    InUse(PathBuf),
    /// Binding, setting the mode or renaming failed.
    #[error("cannot create the control socket {path} (setting `control_socket`)")]
    Create {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A bound control socket; the file is removed when this is dropped (if it is still ours).
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to avoid removing a successor's.
    identity: (u64, u64),
}

impl ControlListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Creates the socket at `path`, mode 0600, making its directory (0700) when missing. A stale
/// socket file left by a dead proxy is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<ControlListener, SocketError> {
    let create = |source| SocketError::Create { path: path.to_owned(), source };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| SocketError::Directory { path: dir.to_owned(), source })?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(SocketError::InUse(path.to_owned()));
    }
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let staging = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_file(&staging);
    let listener = std::os::unix::net::UnixListener::bind(&staging).map_err(create)?;
    let placed = fs::set_permissions(&staging, Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&staging, path));
    if let Err(err) = placed {
        let _ = fs::remove_file(&staging);
        return Err(create(err));
    }
    let metadata = fs::symlink_metadata(path).map_err(create)?;
    listener.set_nonblocking(true).map_err(create)?;
    let listener = UnixListener::from_std(listener).map_err(create)?;
    Ok(ControlListener {
        listener,
        path: path.to_owned(),
        identity: (metadata.dev(), metadata.ino()),
    })
}

/// Accepts control connections until `stopped` turns true; each admitted peer gets its own
/// D-Bus peer-to-peer connection serving the interface.
pub async fn serve(
    listener: ControlListener,
    control: Control,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let accepted = tokio::select! {
            accepted = listener.listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: give the process a moment, then go on.
                warn!(error = %err, "cannot accept a control connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let credentials = match stream.peer_cred() {
            Ok(credentials) => credentials,
            Err(err) => {
                warn!(error = %err, "refused a control connection: its credentials are unreadable");
                continue;
            }
        };
        let (uid, pid) = (credentials.uid(), credentials.pid().unwrap_or(0));
        if uid != 0 && uid != own_uid {
            warn!(
                uid,
                pid,
                "refused a control connection from uid {uid} (pid {pid}): only root and the \
                 service's own user may use the control socket"
            );
            continue;
        }
        debug!(uid, pid, "control connection");
        tokio::spawn(session(stream, control.clone(), uid, pid));
    }
    info!(path = %listener.path.display(), "control socket closed");
}

/// Serves one admitted peer until it disconnects.
async fn session(stream: UnixStream, control: Control, uid: u32, pid: i32) {
    let connection = async {
        zbus::connection::Builder::unix_stream(stream)
            .server(zbus::Guid::generate())?
            .p2p()
            .serve_at(OBJECT_PATH, Interface { control })?
            .build()
            .await
    };
    let connection = match connection.await {
        Ok(connection) => connection,
        Err(err) => {
            warn!(uid, pid, error = %err, "control connection failed during the D-Bus handshake");
            return;
        }
    };
    // The stream ends, or yields an error, once the peer has gone.
    let mut messages = zbus::MessageStream::from(&connection);
    while let Some(Ok(_)) = messages.next().await {}
    debug!(uid, pid, "control connection closed");
}
