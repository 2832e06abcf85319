//! The control plane against a real proxy process: `minedctl` and `dbus-send` on the control
//! socket, the peer-credential and file-mode refusals of a non-root caller, SIGHUP and `Reload`
//! reconciliation, and worker churn while requests stream through.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use miden_proving_service::proto::ProofType;
use miden_proving_service::proto::api_client::ApiClient;
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::support::fixtures::sample_transactions;
use crate::support::requests::{request, tx_request, verify_tx};
use crate::support::{Launch, Proxy, START_TIMEOUT, clean_env, minedctl, standin};

/// Runs `minedctl --socket SOCKET ARGS…` as the current user.
fn ctl(socket: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(minedctl());
    clean_env(&mut command);
    command.arg("--socket").arg(socket).args(args);
    command.output().expect("run minedctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `minedctl workers --json`, as (address, origin) pairs, sorted.
fn worker_set(socket: &Path) -> Vec<(String, String)> {
    let output = ctl(socket, &["workers", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let workers: Vec<Value> = serde_json::from_slice(&output.stdout).expect("workers JSON");
    let mut set: Vec<(String, String)> = workers
        .iter()
        .map(|w| {
            (
                w["address"].as_str().expect("address").to_owned(),
                w["origin"].as_str().expect("origin").to_owned(),
            )
        })
        .collect();
    set.sort();
    set
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut set: Vec<(String, String)> =
        list.iter().map(|(a, o)| ((*a).to_owned(), (*o).to_owned())).collect();
    set.sort();
    set
}

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the control-plane tests switch to uid 65534 and need root (CI runs them as root)"
    );
}

#[tokio::test]
async fn minedctl_adds_lists_and_removes_workers_and_an_added_worker_serves() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    let first = Launch::worker("transaction").start().await;
    let second = Launch::worker("transaction").start().await;
    let mut proxy = Launch::proxy("transaction", &[&first]).start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let socket = proxy.control.clone();
    let (a, b) = (first.addr.to_string(), second.addr.to_string());

    let added = ctl(&socket, &["add-worker", &b]);
    assert!(added.status.success(), "{}", stderr(&added));
    assert_eq!(stdout(&added), format!("added worker {b}\n"));
    let again = ctl(&socket, &["add-worker", &b]);
    assert!(again.status.success(), "adding a present worker is a no-op: {}", stderr(&again));
    assert_eq!(stdout(&again), format!("worker {b} is already present\n"));
    assert_eq!(worker_set(&socket), pairs(&[(&a, "config"), (&b, "runtime")]));
    proxy.wait_healthy(2, 2).await;

    // Mistakes are refused with their text; usage errors exit 2.
    let malformed = ctl(&socket, &["add-worker", "10.0.0.7"]);
    assert_eq!(malformed.status.code(), Some(1));
    assert!(stderr(&malformed).contains("`10.0.0.7` is not host:port"), "{}", stderr(&malformed));
    let unknown = ctl(&socket, &["remove-worker", "10.0.0.7:50051"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no such worker: 10.0.0.7:50051"), "{}", stderr(&unknown));
    assert_eq!(ctl(&socket, &["add-worker"]).status.code(), Some(2));
    assert_eq!(worker_set(&socket), pairs(&[(&a, "config"), (&b, "runtime")]));

    // Remove the configured worker: the one added at run time now serves the request.
    let removed = ctl(&socket, &["remove-worker", &a]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(worker_set(&socket), pairs(&[(&b, "runtime")]));
    let mut client = proxy.daemon.api().await;
    let request = tx_request(&sample.inputs[0]);
    let proof = client.prove(request).await.expect("proved through the added worker");
    verify_tx(&proof.get_ref().payload);
    assert_eq!(second.worker_status().await.requests_served, 1);
    assert_eq!(first.worker_status().await.requests_served, 0);

    let table = stdout(&ctl(&socket, &["workers"]));
    assert!(table.starts_with("ADDRESS"), "{table}");
    assert!(
        table.contains(&b) && table.contains("healthy") && table.contains("runtime"),
        "{table}"
    );
    let status = stdout(&ctl(&socket, &["status"]));
    assert!(
        status.contains("1/1 workers healthy") && status.contains("1 requests served"),
        "{status}"
    );
    let json: Value =
        serde_json::from_str(&stdout(&ctl(&socket, &["status", "--json"]))).expect("status --json");
    assert_eq!(json["workers"][0]["address"], b.as_str());

    // Upstream's commands go over the same socket, in both its spellings (its usage line says
    // `add-worker`, its examples `add-workers`); minedctl takes the plural too.
    let upstream = |command: &str, worker: &str| {
        let mut upstream = Command::new(crate::support::bin());
        clean_env(&mut upstream);
        let output = upstream
            .args([command, "--socket"])
            .arg(&socket)
            .arg(worker)
            .output()
            .expect("run upstream's command");
        assert!(output.status.success(), "{command}: {}", stderr(&output));
    };
    upstream("add-workers", &a);
    assert_eq!(worker_set(&socket), pairs(&[(&a, "runtime"), (&b, "runtime")]));
    upstream("remove-worker", &a);
    assert_eq!(worker_set(&socket), pairs(&[(&b, "runtime")]));
    upstream("add-worker", &a);
    assert!(ctl(&socket, &["remove-workers", &a]).status.success());
    assert_eq!(worker_set(&socket), pairs(&[(&b, "runtime")]));
    assert!(ctl(&socket, &["add-workers", &a]).status.success());
    assert_eq!(worker_set(&socket), pairs(&[(&a, "runtime"), (&b, "runtime")]));
    let old = upstream_control_port(&socket);
    assert_eq!(old.status.code(), Some(2));
    assert!(stderr(&old).contains("root-only Unix socket"), "{}", stderr(&old));
}

fn upstream_control_port(socket: &Path) -> Output {
    let mut command = Command::new(crate::support::bin());
    clean_env(&mut command);
    command
        .args(["remove-workers", "--control-port", "8083", "--socket"])
        .arg(socket)
        .arg("127.0.0.1:50051")
        .output()
        .expect("run remove-workers")
}

#[tokio::test]
async fn dbus_send_calls_the_add_method_as_an_independent_client() {
    let proxy = Launch::proxy("transaction", &[]).start_proxy().await;
    let output = Command::new("dbus-send")
        .arg(format!("--peer=unix:path={}", proxy.control.display()))
        .args([
            "--print-reply",
            "/org/miden/ProverProxy",
            "org.miden.ProverProxy1.AddWorkers",
            "array:string:127.0.0.1:1,127.0.0.1:2",
        ])
        .output()
        .expect("run dbus-send (Debian package dbus-bin)");
    assert!(output.status.success(), "{}", stderr(&output));
    let reply = stdout(&output);
    assert!(reply.contains("\"127.0.0.1:1\"") && reply.contains("boolean true"), "{reply}");
    assert_eq!(
        worker_set(&proxy.control),
        pairs(&[("127.0.0.1:1", "runtime"), ("127.0.0.1:2", "runtime")])
    );

    // A D-Bus error with a clear name and message.
    let output = Command::new("dbus-send")
        .arg(format!("--peer=unix:path={}", proxy.control.display()))
        .args([
            "--print-reply",
            "/org/miden/ProverProxy",
            "org.miden.ProverProxy1.RemoveWorkers",
            "array:string:10.9.9.9:1",
        ])
        .output()
        .expect("run dbus-send");
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("org.miden.ProverProxy1.Error.UnknownWorker")
            && error.contains("no such worker: 10.9.9.9:1"),
        "{error}"
    );
}

/// A copy of `minedctl` that uid 65534 can run (the build tree may sit in a 0700 directory).
fn minedctl_for_nobody(dir: &Path) -> PathBuf {
    let copy = dir.join("minedctl");
    std::fs::copy(minedctl(), &copy).expect("copy minedctl");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    copy
}

fn as_nobody(program: &Path, socket: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    clean_env(&mut command);
    command.arg("--socket").arg(socket).args(args).uid(65534).gid(65534);
    command.output().expect("run minedctl as uid 65534")
}

#[tokio::test]
async fn a_caller_with_uid_65534_is_refused_by_the_peer_check_and_by_file_modes() {
    assert_root();
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let program = minedctl_for_nobody(bin_dir.path());

    // File modes out of the way (0755 directory, socket made 0666): the daemon's own check
    // refuses the caller and logs who it was.
    let open_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let socket = open_dir.path().join("control.sock");
    let mut launch = Launch::proxy("transaction", &[]);
    launch.command.env("MPS_CONTROL_SOCKET", &socket);
    let mut proxy = launch.start_proxy().await;
    assert_eq!(std::fs::metadata(&socket).expect("socket").mode() & 0o777, 0o600);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let refused = as_nobody(&program, &socket, &["add-worker", "127.0.0.1:1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        stderr(&refused),
        format!(
            "minedctl: the proxy at {} refused this user (uid 65534): the control socket is \
             root-only; run with sudo\n",
            socket.display()
        )
    );
    proxy
        .daemon
        .wait_for_output("refused a control connection from uid 65534", START_TIMEOUT)
        .await;
    assert!(worker_set(&socket).is_empty(), "the refused caller changed nothing");

    // Default settings: the daemon makes the socket's directory 0700, so the caller cannot
    // even reach the socket.
    let parent = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = parent.path().join("miden-prover-proxy").join("control.sock");
    let mut launch = Launch::proxy("transaction", &[]);
    launch.command.env("MPS_CONTROL_SOCKET", &socket);
    let proxy = launch.start_proxy().await;
    assert_eq!(proxy.control, socket);
    let dir_mode = std::fs::metadata(socket.parent().expect("dir")).expect("dir").mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let refused = as_nobody(&program, &socket, &["workers"]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        stderr(&refused),
        format!("minedctl: the control socket {} is root-only; run with sudo\n", socket.display())
    );
    // And with no proxy at all, the message says so.
    drop(proxy);
    let nobody_there = ctl(&parent.path().join("none.sock"), &["status"]);
    assert_eq!(nobody_there.status.code(), Some(1));
    assert!(
        stderr(&nobody_there).contains("is miden-prover-proxy running?"),
        "{}",
        stderr(&nobody_there)
    );
}

#[tokio::test]
async fn sighup_and_reload_reconcile_the_file_and_keep_run_time_workers() {
    let launch = Launch::proxy("transaction", &[]);
    let config = launch.dir.path().join("proxy.toml");
    std::fs::write(&config, "workers = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n").expect("write");
    let mut proxy = launch.start_proxy().await;
    let socket = proxy.control.clone();
    assert_eq!(worker_set(&socket), pairs(&[("127.0.0.1:1", "config"), ("127.0.0.1:2", "config")]));
    assert!(ctl(&socket, &["add-worker", "127.0.0.1:3"]).status.success());

    // The file drops :1 and adds :4 → {2, 4} from the file plus :3 added at run time.
    std::fs::write(&config, "workers = [\"127.0.0.1:2\", \"127.0.0.1:4\"]\n").expect("rewrite");
    let before = proxy.daemon.notify.messages().len();
    proxy.daemon.signal(Signal::SIGHUP);
    let reloading = proxy.daemon.notify.wait_for_line("RELOADING=1", before, START_TIMEOUT).await;
    let text = &proxy.daemon.notify.messages()[reloading].text;
    assert!(text.contains("MONOTONIC_USEC="), "{text}");
    proxy.daemon.notify.wait_for_line("READY=1", reloading + 1, START_TIMEOUT).await;
    assert_eq!(
        worker_set(&socket),
        pairs(&[("127.0.0.1:2", "config"), ("127.0.0.1:3", "runtime"), ("127.0.0.1:4", "config")])
    );

    // The same through the control socket, which answers with what changed.
    std::fs::write(&config, "workers = [\"127.0.0.1:4\"]\n").expect("rewrite");
    let reload = ctl(&socket, &["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    assert_eq!(
        stdout(&reload),
        "configuration reloaded; workers added: none; removed: 127.0.0.1:2\n"
    );

    // A broken file changes nothing; the error reaches the log, STATUS= and the caller.
    std::fs::write(&config, "workers = [\"127.0.0.1\"]\nmax_queue_items = \"many\"\n")
        .expect("break");
    let before = proxy.daemon.notify.messages().len();
    proxy.daemon.signal(Signal::SIGHUP);
    let ready = proxy.daemon.notify.wait_for_line("READY=1", before, START_TIMEOUT).await;
    let text = &proxy.daemon.notify.messages()[ready].text;
    assert!(text.contains("reload failed"), "{text}");
    proxy
        .daemon
        .wait_for_output("reload failed; the running configuration stays in force", START_TIMEOUT)
        .await;
    assert_eq!(
        worker_set(&socket),
        pairs(&[("127.0.0.1:3", "runtime"), ("127.0.0.1:4", "config")])
    );
    let reload = ctl(&socket, &["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(stderr(&reload).contains("max_queue_items"), "{}", stderr(&reload));
    proxy_stops_cleanly(&mut proxy).await;
}

async fn proxy_stops_cleanly(proxy: &mut Proxy) {
    proxy.daemon.signal(Signal::SIGTERM);
    assert!(proxy.daemon.wait(START_TIMEOUT).await.success());
    assert!(!proxy.control.exists(), "the control socket is removed at exit");
}

/// STAND-IN workers (fixed 5 ms delay) carry a steady stream of requests while `minedctl`
/// adds and removes a third stand-in 100 times each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_adds_and_removes_under_load_fail_no_request() {
    let delay = Duration::from_millis(5);
    let version = env!("CARGO_PKG_VERSION");
    let (steady, _) = standin::start(version, delay).await;
    let (other, _) = standin::start(version, delay).await;
    let (churned, churned_worker) = standin::start(version, delay).await;
    let mut launch = Launch::proxy_for("transaction", &[steady, other]);
    launch.command.env("MPS_MAX_QUEUE_ITEMS", "64");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(2, 2).await;
    let socket = proxy.control.clone();

    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..6 {
        let mut client = ApiClient::new(proxy.daemon.channel().await);
        let (done, answered) = (Arc::clone(&done), Arc::clone(&answered));
        clients.spawn(async move {
            // Every request different: identical ones would share one proof and be kept.
            let mut sent = 0u64;
            while !done.load(Ordering::SeqCst) {
                sent += 1;
                let mut payload = vec![1; 4096];
                payload[..8].copy_from_slice(&sent.to_le_bytes());
                payload[8] = u8::try_from(n).expect("six clients");
                let request = request(ProofType::Transaction, payload);
                let result = client.prove(request).await;
                result.expect("no request fails while workers come and go");
                answered.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let address = churned.to_string();
    let worker = churned_worker.clone();
    let churn = tokio::task::spawn_blocking(move || {
        for round in 0..100 {
            let output = ctl(&socket, &["add-worker", &address]);
            assert!(output.status.success(), "add-worker: {}", stderr(&output));
            // Every other round, remove it while it proves a request (when it gets one soon).
            if round % 2 == 0 {
                let started = std::time::Instant::now();
                while !worker.busy() && started.elapsed() < Duration::from_secs(2) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let output = ctl(&socket, &["remove-worker", &address]);
            assert!(output.status.success(), "remove-worker: {}", stderr(&output));
        }
    });
    tokio::time::timeout(Duration::from_secs(120), churn)
        .await
        .expect("200 operations within 2 minutes")
        .expect("every add and remove succeeded");
    done.store(true, Ordering::SeqCst);
    while let Some(client) = clients.join_next().await {
        client.expect("a client failed a request");
    }
    let answered = answered.load(Ordering::SeqCst);
    eprintln!("{answered} requests answered, {} by the churned worker", churned_worker.served());
    assert!(answered >= 50, "only {answered} requests answered during the churn");
    assert!(churned_worker.served() > 0, "the churned worker took requests while present");
    assert_eq!(worker_set(&proxy.control).len(), 2);
}

/// Waits until the state file at `path` lists exactly `workers` (it is rewritten on each change).
async fn wait_for_state(path: &Path, workers: &[&str]) -> String {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let listed: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        if text.ends_with("# end\n") && listed == workers {
            return text;
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "{} lists {listed:?}, not {workers:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn workers_added_at_run_time_survive_a_restart_and_a_damaged_state_file_is_kept_aside() {
    let state = tempfile::tempdir().expect("tempdir");
    let file = state.path().join("workers");
    let start = || {
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().expect("address");
        let mut launch = Launch::proxy_for("transaction", &[addr]);
        launch.command.env("MPS_STATE_FILE", &file);
        launch.start_proxy()
    };

    let mut proxy = start().await;
    let socket = proxy.control.clone();
    assert!(ctl(&socket, &["add-worker", "127.0.0.1:3", "127.0.0.1:4"]).status.success());
    wait_for_state(&file, &["127.0.0.1:3", "127.0.0.1:4"]).await;
    assert!(ctl(&socket, &["remove-worker", "127.0.0.1:4"]).status.success());
    let saved = wait_for_state(&file, &["127.0.0.1:3"]).await;
    proxy_stops_cleanly(&mut proxy).await;

    // A write that never got renamed into place (a crash mid-write) is not read.
    std::fs::write(state.path().join("workers.new"), "127.0.0.1:9\n").expect("write");
    let mut proxy = start().await;
    assert_eq!(
        worker_set(&proxy.control),
        pairs(&[("127.0.0.1:1", "config"), ("127.0.0.1:3", "runtime")])
    );
    proxy.daemon.wait_for_output("restored 1 workers added at run time", START_TIMEOUT).await;
    proxy_stops_cleanly(&mut proxy).await;

    // Cut short mid-write: never a shorter list; reported, kept aside, not fatal.
    let cut = &saved[..saved.len() - "# end\n".len()];
    std::fs::write(&file, cut).expect("write");
    let mut proxy = start().await;
    assert_eq!(worker_set(&proxy.control), pairs(&[("127.0.0.1:1", "config")]));
    proxy.daemon.wait_for_output("the state file is damaged", START_TIMEOUT).await;
    let output = proxy.daemon.output();
    assert!(output.contains("cut short"), "{output}");
    let aside: Vec<_> = std::fs::read_dir(state.path())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("workers.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside");
    assert_eq!(std::fs::read_to_string(aside[0].path()).expect("read"), cut);
    // The next change writes a whole file again.
    assert!(ctl(&proxy.control, &["add-worker", "127.0.0.1:5"]).status.success());
    wait_for_state(&file, &["127.0.0.1:5"]).await;
    proxy_stops_cleanly(&mut proxy).await;
}

/// `max_workers` counts configured and run-time workers together: `minedctl add-worker` beyond
/// it is refused with what to do, and nothing is added. With `public_worker_addresses = false`
/// the public `ProxyStatusApi/Status` answer names no address; the status port still does.
#[tokio::test]
async fn max_workers_refuses_one_more_and_public_status_can_hide_worker_addresses() {
    let (delay, version) = (Duration::from_millis(5), env!("CARGO_PKG_VERSION"));
    let (configured, _) = standin::start(version, delay).await;
    let (added, _) = standin::start(version, delay).await;
    let (refused, _) = standin::start(version, delay).await;
    let mut launch = Launch::proxy_for("transaction", &[configured]);
    launch.command.env("MPS_MAX_WORKERS", "2").env("MPS_PUBLIC_WORKER_ADDRESSES", "false");
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let socket = proxy.control.clone();
    let (configured, added, refused) =
        (configured.to_string(), added.to_string(), refused.to_string());

    let first = ctl(&socket, &["add-worker", &added]);
    assert!(first.status.success(), "{}", stderr(&first));
    let over = ctl(&socket, &["add-worker", &refused]);
    assert_eq!(over.status.code(), Some(1), "{}", stdout(&over));
    let message = stderr(&over);
    assert!(
        message.contains(&format!("{refused} not added"))
            && message.contains("max_workers")
            && message.contains("minedctl remove-worker"),
        "{message}"
    );
    assert_eq!(worker_set(&socket), pairs(&[(&configured, "config"), (&added, "runtime")]));
    proxy.wait_healthy(2, 2).await;

    let public = miden_proving_service::proto::proxy_status_api_client::ProxyStatusApiClient::new(
        proxy.daemon.channel().await,
    )
    .status(())
    .await
    .expect("ProxyStatusApi/Status")
    .into_inner();
    let names: Vec<&str> = public.workers.iter().map(|w| w.address.as_str()).collect();
    assert_eq!(names, ["worker-1", "worker-2"]);
    let status = proxy.status_json().await;
    let listed: Vec<&str> = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["address"].as_str())
        .collect();
    assert!(listed.contains(&configured.as_str()) && listed.contains(&added.as_str()), "{status}");
}
