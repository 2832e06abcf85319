//! Test harness: starts the real daemons as processes on `127.0.0.1:0`, waits for `READY=1` on a
//! real `NOTIFY_SOCKET`, discovers the port each bound from `/proc`, and talks gRPC to them.

pub mod fixtures;
pub mod hostile;
pub mod otlp;
pub mod standin;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miden_proving_service::proto;
use miden_proving_service::proto::api_client::ApiClient;
use miden_proving_service::proto::worker_status_api_client::WorkerStatusApiClient;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, setsockopt, sockopt};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;

/// The service binary under test: `MPSDEV_TEST_BIN` when set (to run the tests against another
/// build, such as `scripts/build-fast.sh`'s); else cargo names it for tests, and examples find it
/// beside themselves (`target/<profile>/examples/..` → `target/<profile>/miden-proving-service`).
pub fn bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MPSDEV_TEST_BIN") {
        return PathBuf::from(path);
    }
    if let Some(path) = option_env!("CARGO_BIN_EXE_miden-proving-service") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/examples/<example>")
        .join("miden-proving-service");
    assert!(path.exists(), "{} is missing: run `cargo build --bins` first", path.display());
    path
}

/// `minedctl`, found like [`bin`].
pub fn minedctl() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_minedctl") {
        return PathBuf::from(path);
    }
    bin().with_file_name("minedctl")
}

/// How long a daemon may take to report `READY=1`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A daemon process started by a test; killed when dropped.
pub struct Daemon {
    /// The process (for a daemon started through a wrapper, the wrapper).
    pub child: Child,
    /// The daemon's own pid (the sender of `READY=1`).
    pub pid: i32,
    /// Where its gRPC listener is.
    pub addr: SocketAddr,
    /// The notify socket it reports to.
    pub notify: NotifySocket,
    /// Its stdout and stderr lines, as they arrive.
    pub output: Arc<Mutex<Vec<String>>>,
    /// Bumped for every output line.
    output_changed: tokio::sync::watch::Receiver<usize>,
    /// Keeps the notify socket's directory alive.
    pub dir: TempDir,
}

/// How to start a daemon.
pub struct Launch {
    /// The program and its arguments.
    pub command: Command,
    /// The temporary directory that holds the notify socket (and any files the test writes).
    pub dir: TempDir,
}

impl Launch {
    /// `miden-proving-service ARGS…` with a clean `MPS_*`/`RUST_LOG` environment and no
    /// configuration file from `/etc` (each test states what it wants).
    pub fn service(args: &[&str]) -> Self {
        Launch::service_from(&bin(), args)
    }

    /// [`Launch::service`] of another build of the binary.
    pub fn service_from(program: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(program);
        command.args(args);
        clean_env(&mut command);
        Launch { command, dir }
    }

    /// A worker for `kind` on 127.0.0.1 at a free port.
    pub fn worker(kind: &str) -> Self {
        Launch::worker_at(kind, 0)
    }

    /// A worker for `kind` on 127.0.0.1 at `port` (0: a free one).
    pub fn worker_at(kind: &str, port: u16) -> Self {
        Launch::worker_from(&bin(), kind, port)
    }

    /// A worker for `kind` on 127.0.0.1 at `port`, run from `program` (another build).
    pub fn worker_from(program: &Path, kind: &str, port: u16) -> Self {
        let mut launch = Launch::service_from(program, &[]);
        let config = launch.dir.path().join("worker.toml");
        std::fs::write(&config, "").expect("empty worker.toml");
        launch.command.args([
            "start-worker",
            "--localhost",
            "--port",
            &port.to_string(),
            "--prover-type",
            kind,
            "--config",
            config.to_str().expect("utf-8 path"),
        ]);
        launch
    }

    /// A worker for `kind` that keeps no finished proofs: one that proves the same request
    /// again (benchmarks, which measure proving).
    #[allow(dead_code)] // The benchmarks in examples/ use it; the tests want the defaults.
    pub fn worker_proving_every_request(kind: &str) -> Self {
        let mut launch = Launch::worker(kind);
        launch.command.env("MPS_WORKER_PROOF_CACHE_SIZE", "0");
        launch
    }

    /// A proxy for `kind` on 127.0.0.1 (gRPC, status and metrics on free ports) in front of
    /// `workers`, with health checks every 200 ms and a rate limit high enough for bursts.
    pub fn proxy(kind: &str, workers: &[&Daemon]) -> Self {
        let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
        Launch::proxy_for(kind, &addrs)
    }

    /// [`Launch::proxy`] for workers given by address (such as the benchmarks' stand-ins).
    pub fn proxy_for(kind: &str, workers: &[SocketAddr]) -> Self {
        let mut launch = Launch::service(&[]);
        let config = launch.dir.path().join("proxy.toml");
        std::fs::write(&config, "").expect("empty proxy.toml");
        launch.command.args([
            "start-proxy",
            "--bind-address",
            "127.0.0.1",
            "--port",
            "0",
            "--status-port",
            "0",
            "--metrics-port",
            "0",
            "--prover-type",
            kind,
            "--config",
            config.to_str().expect("utf-8 path"),
        ]);
        launch.command.args(workers.iter().map(ToString::to_string));
        launch.command.envs([
            ("MPS_HEALTH_CHECK_INTERVAL", "200ms"),
            ("MPS_HEALTH_CHECK_TIMEOUT", "2s"),
            ("MPS_CONNECTION_TIMEOUT", "2s"),
            ("MPS_MAX_REQ_PER_SEC", "1000"),
        ]);
        launch.command.env("MPS_CONTROL_SOCKET", launch.dir.path().join("control.sock"));
        // Never the machine's /var/lib/miden-prover-proxy (the tests run as root).
        launch.command.env("MPS_STATE_FILE", launch.dir.path().join("workers"));
        launch
    }

    /// Starts a proxy and finds its three listeners from its start-up line.
    pub async fn start_proxy(self) -> Proxy {
        let mut daemon = self.start().await;
        daemon.wait_for_output("proxy listening on", START_TIMEOUT).await;
        let field = |name: &str| -> String {
            let output = daemon.output();
            let line = output.lines().find(|l| l.contains("proxy listening on")).expect("line");
            let value = line
                .split_whitespace()
                .find_map(|word| word.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in {line}"));
            value.trim_matches('"').to_owned()
        };
        let addr = |name: &str| -> SocketAddr {
            let value = field(name);
            value.parse().unwrap_or_else(|_| panic!("{name}={value}"))
        };
        let (grpc, status, metrics) = (addr("address"), addr("status"), addr("metrics"));
        let control = PathBuf::from(field("control"));
        daemon.addr = grpc;
        Proxy { daemon, status, metrics, control }
    }

    /// Starts the process and waits for `READY=1`; panics with its output if it does not come.
    pub async fn start(self) -> Daemon {
        let Launch { mut command, dir } = self;
        let mut notify = NotifySocket::bind(dir.path());
        command.env("NOTIFY_SOCKET", &notify.path).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn the daemon");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (output_tx, output_changed) = tokio::sync::watch::channel(0usize);
        let output_tx = Arc::new(output_tx);
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = Arc::clone(&output);
            let tx = Arc::clone(&output_tx);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("    daemon| {line}");
                    let count = {
                        let mut lines = sink.lock().expect("output");
                        lines.push(line);
                        lines.len()
                    };
                    let _ = tx.send(count);
                }
            });
        }
        let ready = tokio::select! {
            index = notify.wait_for_line("READY=1", 0, START_TIMEOUT) => index,
            status = wait_exit(&mut child) => panic!(
                "the daemon exited with {status} before READY=1; output:\n{}",
                output.lock().expect("output").join("\n")
            ),
        };
        let pid = notify.messages()[ready].pid;
        let addr = *listening_addrs(pid).first().expect("a ready daemon listens on a TCP port");
        Daemon { child, pid, addr, notify, output, output_changed, dir }
    }
}

/// Removes the variables that would change a daemon's configuration behind a test's back.
pub fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("MPS_")
            || key == "RUST_LOG"
            || key == "JOURNAL_STREAM"
            || key.starts_with("OTEL_")
            || key == "NOTIFY_SOCKET"
            || key.starts_with("WATCHDOG_")
        {
            command.env_remove(key);
        }
    }
}

async fn wait_exit(child: &mut Child) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Daemon {
    /// The directory of its notify socket and of the files its test wrote (`worker.toml`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://ADDR` for gRPC clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected gRPC channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("valid endpoint")
            .connect()
            .await
            .expect("connect to the daemon")
    }

    /// A `remote_prover.Api` client on a fresh connection.
    pub async fn api(&self) -> ApiClient<Channel> {
        ApiClient::new(self.channel().await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// A `WorkerStatusApi` client.
    pub async fn worker_status(&self) -> proto::WorkerStatus {
        WorkerStatusApiClient::new(self.channel().await)
            .status(())
            .await
            .expect("worker status")
            .into_inner()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid), signal).expect("signal the daemon");
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        tokio::time::timeout(timeout, wait_exit(&mut self.child))
            .await
            .expect("the daemon exits in time")
    }

    /// Waits until the daemon has printed a line containing `text`.
    pub async fn wait_for_output(&mut self, text: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.output().contains(text) {
            let changed = tokio::time::timeout_at(deadline, self.output_changed.changed()).await;
            assert!(changed.is_ok(), "no `{text}` printed in {timeout:?}:\n{}", self.output());
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().expect("output").join("\n")
    }
}

impl Drop for Daemon {
    /// Kills the daemon; a wrapper (such as `tests/journald.sh`) gets two seconds to clean up
    /// after it before it is killed too.
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// A running proxy and its extra listeners.
pub struct Proxy {
    /// The process; `daemon.addr` is the gRPC port.
    pub daemon: Daemon,
    /// JSON `GET /status`.
    pub status: SocketAddr,
    /// Prometheus `GET /metrics`.
    pub metrics: SocketAddr,
    /// The control socket ("off" when disabled).
    pub control: PathBuf,
}

impl Proxy {
    /// The JSON status document.
    pub async fn status_json(&self) -> serde_json::Value {
        let (code, body) = http_get(self.status, "/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    /// Waits for `STATUS=` to say "N/M workers healthy".
    pub async fn wait_healthy(&mut self, healthy: usize, total: usize) {
        self.daemon
            .notify
            .wait_for_status(&format!("{healthy}/{total} workers healthy"), START_TIMEOUT)
            .await;
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (code, body.to_owned())
}
