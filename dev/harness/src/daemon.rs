//! Starting a daemon under test: [`Launch`] says how (the program, its arguments and a clean
//! environment), [`Launch::start`] runs it and waits for `READY=1` on a real `NOTIFY_SOCKET`, and
//! the [`Daemon`] it returns is killed when dropped. A daemon's ports are discovered one way, from
//! `/proc` ([`listening_addrs`]); the proxy's start-up line only labels its three.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miden_proving_service::proto;
use miden_proving_service::proto::api_client::ApiClient;
use miden_proving_service::proto::worker_status_api_client::WorkerStatusApiClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::http::http_get;
use crate::notify::NotifySocket;
use crate::procfs::listening_addrs;

/// The service binary under test: `MPSDEV_TEST_BIN` when set (to run the tests against another
/// build, such as `scripts/build-fast.sh`'s); else the one cargo built beside the running
/// program, [`in_target_dir`].
pub fn bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MPSDEV_TEST_BIN") {
        return PathBuf::from(path);
    }
    in_target_dir("miden-proving-service")
}

/// `minedctl` of this build (`MPSDEV_TEST_BIN` does not move it).
pub fn minedctl() -> PathBuf {
    in_target_dir("minedctl")
}

/// An example program of this build, `target/<profile>/examples/<name>` (`cargo test` and
/// `cargo build --examples` build them).
pub fn example(name: &str) -> PathBuf {
    in_target_dir(&format!("examples/{name}"))
}

/// A program of this package in `target/<profile>/`: the test binary runs from
/// `target/<profile>/deps/`, an example from `target/<profile>/examples/`, so both find it one
/// directory up. Cargo builds the binaries before the integration tests; examples need a
/// `cargo build --bins` first.
fn in_target_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/{deps,examples}/<program>")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins --examples` first",
        path.display()
    );
    path
}

/// How long a daemon may take to report `READY=1`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// A worker for `kind` on every address of its host (a rig's host) at `port`.
    pub fn worker_on_all_addresses(kind: &str, port: u16) -> Self {
        let mut launch = Launch::service(&[]);
        let config = launch.dir.path().join("worker.toml");
        std::fs::write(&config, "").expect("empty worker.toml");
        let config = config.to_str().expect("utf-8 path").to_owned();
        let port = port.to_string();
        let args = ["start-worker", "--port", &port, "--prover-type", kind, "--config", &config];
        launch.command.args(args);
        launch
    }

    /// A worker for `kind` that keeps no finished proofs: one that proves the same request
    /// again (benchmarks, which measure proving).
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
        let workers: Vec<String> = workers.iter().map(ToString::to_string).collect();
        Launch::proxy_at("127.0.0.1", kind, &workers)
    }

    /// [`Launch::proxy`] listening on `bind` (a rig host's address) for workers as written.
    pub fn proxy_at(bind: &str, kind: &str, workers: &[String]) -> Self {
        let mut launch = Launch::service(&[]);
        let config = launch.dir.path().join("proxy.toml");
        std::fs::write(&config, "").expect("empty proxy.toml");
        launch.command.args([
            "start-proxy",
            "--bind-address",
            bind,
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
        launch.command.args(workers);
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

    /// Starts a proxy. Its ports are the ones `/proc` shows it listening on, as for any daemon;
    /// its start-up line only says which of them is which (gRPC, status, metrics), and each port
    /// the line names must be one of those.
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
        let listening = listening_addrs(daemon.pid);
        let addr = |name: &str| -> SocketAddr {
            let value = field(name);
            let addr = value.parse().unwrap_or_else(|_| panic!("{name}={value}"));
            assert!(listening.contains(&addr), "{name}={addr}, not among {listening:?}");
            addr
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
            || key == "GLIBC_TUNABLES"
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
        self.wait_for_lines(text, 1, timeout).await;
    }

    /// Waits until the daemon has printed `count` lines containing `text`. A proxy writes a
    /// request's log line as its answer leaves, so a client may hold the answer first.
    pub async fn wait_for_lines(&mut self, text: &str, count: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let printed = |output: &str| output.lines().filter(|l| l.contains(text)).count();
        while printed(&self.output()) < count {
            let changed = tokio::time::timeout_at(deadline, self.output_changed.changed()).await;
            assert!(
                changed.is_ok(),
                "not {count} lines with `{text}` printed in {timeout:?}:\n{}",
                self.output()
            );
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
