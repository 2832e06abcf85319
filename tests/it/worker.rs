//! The worker daemon, end to end: real proofs of each kind, every error path, signals, reload,
//! configuration errors and journald.

use std::time::{Duration, Instant};

use miden_objects::batch::ProvenBatch;
use miden_objects::block::ProvenBlock;
use miden_objects::utils::{Deserializable, Serializable};
use miden_proving_service::proto::api_client::ApiClient;
use miden_proving_service::proto::{ProofRequest, ProofType};
use nix::sys::signal::Signal;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::fixtures::sample_transactions;
use crate::support::requests::{request, tx_request, verify_tx};
use crate::support::{Launch, START_TIMEOUT, Seen, children};

/// Generous bound for one real transaction proof on a loaded 2-core machine.
const PROOF_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn proves_a_transaction_a_batch_and_a_block() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let tx_worker = Launch::worker("transaction").start().await;
    let batch_worker = Launch::worker("batch").start().await;
    let block_worker = Launch::worker("block").start().await;

    let mut proven = Vec::new();
    for inputs in &sample.inputs {
        let proof = tx_worker.api().await.prove(tx_request(inputs)).await.expect("tx proof");
        proven.push(verify_tx(&proof.into_inner().payload));
    }

    let proposed_batch =
        sample.chain.propose_transaction_batch(proven.clone()).expect("propose a batch");
    let batch_id = proposed_batch.id();
    let proof = batch_worker
        .api()
        .await
        .prove(request(ProofType::Batch, proposed_batch.to_bytes()))
        .await
        .expect("batch proof")
        .into_inner();
    let batch = ProvenBatch::read_from_bytes(&proof.payload).expect("the batch proof decodes");
    assert_eq!(batch.id(), batch_id);
    assert_eq!(batch.transactions().as_slice().len(), 2);

    let proposed_block = sample.chain.propose_block([batch]).expect("propose a block");
    let block_num = proposed_block.block_num();
    let proof = block_worker
        .api()
        .await
        .prove(request(ProofType::Block, proposed_block.to_bytes()))
        .await
        .expect("block proof")
        .into_inner();
    let block = ProvenBlock::read_from_bytes(&proof.payload).expect("the block proof decodes");
    assert_eq!(block.header().block_num(), block_num);
}

/// Also the worker's side of "no proof is computed twice": while a proof runs, an identical
/// request joins it and a different one is answered busy; afterwards the kept proof answers.
#[tokio::test]
async fn refuses_bad_requests_clearly_joins_an_identical_one_and_answers_busy_to_another() {
    let sample = sample_transactions(2).await.expect("sample transactions");
    let mut worker = Launch::worker("transaction").start().await;
    let mut api = worker.api().await;

    // Garbage payload: INVALID_ARGUMENT that says what failed.
    let err = api.prove(request(ProofType::Transaction, vec![1, 2, 3])).await.expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not a valid TransactionInputs"), "{}", err.message());

    // A proof type this worker does not serve: UNIMPLEMENTED.
    let err = api.prove(request(ProofType::Batch, vec![0; 8])).await.expect_err("wrong type");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("proves transaction requests only"), "{}", err.message());

    // A proof_type number the protocol does not define: INVALID_ARGUMENT, never a transaction.
    let unknown = ProofRequest { proof_type: 7, payload: sample.inputs[0].to_bytes() };
    let err = api.prove(unknown).await.expect_err("unknown type");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("unknown proof_type 7"), "{}", err.message());

    // Health, status and reflection.
    let mut health = tonic_health::pb::health_client::HealthClient::new(worker.channel().await);
    for service in ["", "remote_prover.Api"] {
        let check = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let status = health.check(check).await.expect("health check").into_inner().status;
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    }
    let status = worker.worker_status().await;
    // "0.1.0", or "0.1.0+x86-64-v3" when MPSDEV_TEST_BIN names the fast build.
    assert_eq!(status.version.split('+').next(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(status.supported_proof_type, ProofType::Transaction as i32);
    assert!(!status.busy);
    let services = reflected_services(&worker).await;
    for expected in ["remote_prover.Api", "remote_prover.WorkerStatusApi", "grpc.health.v1.Health"]
    {
        assert!(services.iter().any(|s| s == expected), "{expected} missing from {services:?}");
    }

    // The same worker still proves a valid request after all that. While it does, an identical
    // request joins it, and a different one is refused as busy before the first proof has ended.
    let spawn_prove = |api: &ApiClient<Channel>, request| {
        let mut api = api.clone();
        tokio::spawn(async move { api.prove(request).await })
    };
    let first = spawn_prove(&api, tx_request(&sample.inputs[0]));
    let proving = worker.notify.wait_for_status("proving transaction", PROOF_TIMEOUT).await;
    assert!(proving.contains("for account 0x"), "{proving}");
    let joined = spawn_prove(&api, tx_request(&sample.inputs[0]));
    worker.wait_for_output("an identical request is being proved", START_TIMEOUT).await;
    let asked = Instant::now();
    let err = api.prove(tx_request(&sample.inputs[1])).await.expect_err("busy");
    let busy_after = asked.elapsed();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "Server is busy handling another request");
    assert!(!first.is_finished(), "the busy answer must arrive while the first proof runs");
    assert!(worker.worker_status().await.busy);
    eprintln!("busy answer after {busy_after:?} while the first proof was running");

    let proof = first.await.expect("join").expect("the first request is proved").into_inner();
    verify_tx(&proof.payload);
    let shared = joined.await.expect("join").expect("the identical request's proof").into_inner();
    assert_eq!(shared.payload, proof.payload, "the joiner gets the same proof");
    let status = worker.worker_status().await;
    assert!(!status.busy);
    assert_eq!(status.requests_served, 2, "the garbage payload and one proof");

    // Asked again once it ended, the kept proof answers: nothing is proved.
    let kept = api.prove(tx_request(&sample.inputs[0])).await.expect("the kept proof");
    assert_eq!(kept.into_inner().payload, proof.payload);
    assert_eq!(worker.worker_status().await.requests_served, 2, "no prover process ran");
    // The log lines are written as the answers leave; their reading may lag a busy machine.
    for outcome in ["outcome=\"joined\"", "outcome=\"cached\""] {
        worker.wait_for_output(outcome, START_TIMEOUT).await;
    }
    let logged = worker.output();
    let answered: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("answered with an identical request's proof"))
        .collect();
    assert_eq!(answered.len(), 2, "{logged}");
    assert!(answered[0].contains("joined") && answered[1].contains("cached"), "{answered:?}");
    worker.notify.wait_for_status("idle", START_TIMEOUT).await;
    worker.signal(Signal::SIGTERM);
    assert!(worker.wait(START_TIMEOUT).await.success());
}

async fn reflected_services(worker: &crate::support::Daemon) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(worker.channel().await);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(list))
        .await
        .expect("reflection call")
        .into_inner();
    let response = responses.message().await.expect("reflection answer").expect("one answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn sigterm_lets_the_proof_in_flight_reach_its_client() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    // While this is set, a process the worker leaves behind is re-parented to this test process,
    // not to init, and stays visible (as a zombie at least) however briefly it outlived the
    // worker: under systemd it would have been SIGKILLed as a leftover of the service.
    nix::sys::prctl::set_child_subreaper(true).expect("become a subreaper");
    let mut worker = Launch::worker("transaction").start().await;
    let proving = {
        let mut api = worker.api().await;
        let req = tx_request(&sample.inputs[0]);
        tokio::spawn(async move { api.prove(req).await })
    };
    worker.notify.wait_for_status("proving", PROOF_TIMEOUT).await;
    let provers: Vec<Seen> = children(worker.pid).into_iter().map(Seen::now).collect();
    assert!(!provers.is_empty(), "no prover process while proving");
    worker.signal(Signal::SIGTERM);
    worker.notify.wait_for_line("STOPPING=1", 0, START_TIMEOUT).await;
    // grace_period (60 s) + 10 s: systemd's stop timeout covers a raised grace period too.
    worker.notify.wait_for_line("EXTEND_TIMEOUT_USEC=70000000", 0, START_TIMEOUT).await;

    let proof = proving.await.expect("join").expect("the proof in flight is delivered");
    verify_tx(&proof.into_inner().payload);
    let status = worker.wait(PROOF_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "{}", worker.output());
    // The prover process that proved was killed and reaped before the worker exited.
    let me = i32::try_from(std::process::id()).expect("a pid");
    let adopted: Vec<i32> =
        provers.iter().filter(|seen| seen.parent() == Some(me)).map(|seen| seen.pid).collect();
    nix::sys::prctl::set_child_subreaper(false).expect("stop being a subreaper");
    for pid in &adopted {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid), None);
    }
    assert!(adopted.is_empty(), "prover processes outlived the worker: {adopted:?}");
}

#[tokio::test]
async fn sighup_reloads_and_a_broken_file_keeps_the_running_configuration() {
    // Everything from the file, so that editing it changes what a restart would apply.
    let mut launch = Launch::service(&[]);
    let config = launch.dir.path().join("worker.toml");
    let original = "port = 0\nlocalhost = true\nprover_type = \"block\"\n";
    std::fs::write(&config, original).expect("write config");
    launch.command.args(["start-worker", "--config", config.to_str().expect("utf-8")]);
    let mut worker = launch.start().await;

    let edited = "port = 1\nlocalhost = true\nprover_type = \"block\"\nlog_filter = \"debug\"\n";
    std::fs::write(&config, edited).expect("edit config");
    let seen = worker.notify.messages().len();
    worker.signal(Signal::SIGHUP);
    let reloading = worker.notify.wait_for_line("RELOADING=1", seen, START_TIMEOUT).await;
    let message = &worker.notify.messages()[reloading].text;
    assert!(message.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{message}");
    worker.notify.wait_for_line("READY=1", reloading, START_TIMEOUT).await;
    worker.wait_for_output("take effect only after a restart", START_TIMEOUT).await;

    std::fs::write(&config, "port = \"x\"\n").expect("write broken config");
    let seen = worker.notify.messages().len();
    worker.signal(Signal::SIGHUP);
    let reloading = worker.notify.wait_for_line("RELOADING=1", seen, START_TIMEOUT).await;
    let ready = worker.notify.wait_for_line("READY=1", reloading, START_TIMEOUT).await;
    let message = &worker.notify.messages()[ready].text;
    assert!(message.contains("STATUS=idle; reload failed:"), "{message}");
    worker.wait_for_output("reload failed", START_TIMEOUT).await;

    // Still serving, with the old settings.
    assert_eq!(worker.worker_status().await.supported_proof_type, ProofType::Block as i32);
}

#[tokio::test]
async fn watchdog_pings_at_half_the_interval() {
    let mut launch = Launch::worker("block");
    launch.command.env("WATCHDOG_USEC", "200000");
    let mut worker = launch.start().await;
    let first = worker.notify.wait_for_line("WATCHDOG=1", 0, START_TIMEOUT).await;
    worker.notify.wait_for_line("WATCHDOG=1", first + 1, START_TIMEOUT).await;
}

#[tokio::test]
async fn a_bad_file_is_reported_whole_before_anything_is_bound() {
    let mut launch = Launch::service(&[]);
    let config = launch.dir.path().join("worker.toml");
    std::fs::write(&config, "port = \"fifty\"\nprover_typ = \"batch\"\n").expect("write config");
    let notify = crate::support::NotifySocket::bind(launch.dir.path());
    let output = launch
        .command
        .args(["start-worker", "--localhost", "--config", config.to_str().expect("utf-8")])
        .env("NOTIFY_SOCKET", &notify.path)
        .output()
        .expect("run the worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "EX_CONFIG; stderr: {stderr}");
    assert!(stderr.contains("2 problems"), "{stderr}");
    assert!(stderr.contains("worker.toml: key `port`"), "{stderr}");
    assert!(stderr.contains("worker.toml: key `prover_typ`: unknown key"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("listening"), "nothing may be bound: {stdout}");
    assert!(notify.messages().is_empty(), "no READY=1: {:?}", notify.messages());
}

#[tokio::test]
async fn flags_beat_environment_beat_file() {
    let mut launch = Launch::worker("block");
    let config = launch.dir.path().join("worker.toml");
    std::fs::write(&config, "prover_type = \"transaction\"\nlocalhost = true\n").expect("config");
    // The environment beats the file; the --prover-type flag (block) beats the environment.
    launch.command.env("MPS_WORKER_PROVER_TYPE", "batch");
    let worker = launch.start().await;
    assert_eq!(worker.worker_status().await.supported_proof_type, ProofType::Block as i32);
    assert!(worker.addr.ip().is_loopback());
}

#[tokio::test]
async fn a_transaction_prover_process_starts_with_the_malloc_settings_of_a_warm_one() {
    const WARM: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864";
    const WARM_FIRST: &str = "glibc.malloc.mmap_threshold=33554432";
    // The spare a worker starts at once, and the GLIBC_TUNABLES it was given.
    async fn spare_tunables(launch: Launch) -> Option<String> {
        let worker = launch.start().await;
        let deadline = Instant::now() + START_TIMEOUT;
        // Until its `exec`, a child has the worker's environment.
        let exec_done = |pid: &i32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == b"prove-job"))
        };
        let spare = loop {
            if let Some(pid) = children(worker.pid).into_iter().find(exec_done) {
                break pid;
            }
            assert!(Instant::now() < deadline, "no spare prover process");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let environ = std::fs::read(format!("/proc/{spare}/environ")).expect("its environment");
        environ.split(|b| *b == 0).find_map(|var| {
            let var = std::str::from_utf8(var).ok()?;
            var.strip_prefix("GLIBC_TUNABLES=").map(str::to_owned)
        })
    }
    // glibc 2.36 parses the variable in place and ends it after the first setting's value
    // (`/proc` shows that memory), though it applies them all: either form is what was set.
    let tunables = spare_tunables(Launch::worker("transaction")).await.expect("GLIBC_TUNABLES");
    assert!(WARM.starts_with(&tunables) && tunables.starts_with(WARM_FIRST), "{tunables}");
    // A batch process proves request after request: warm from its second.
    assert_eq!(spare_tunables(Launch::worker("batch")).await, None);
    // What the operator set is theirs.
    let mut launch = Launch::worker("transaction");
    launch.command.env("GLIBC_TUNABLES", "glibc.malloc.arena_max=2");
    let tunables = spare_tunables(launch).await;
    assert_eq!(tunables.as_deref(), Some("glibc.malloc.arena_max=2"));
}

#[tokio::test]
async fn logs_reach_journald_with_priority_and_span_fields() {
    let journal = tempfile::NamedTempFile::new().expect("journal output file");
    let mut launch = Launch::worker("transaction");
    let worker_cmd: Vec<String> = std::iter::once(launch.command.get_program())
        .chain(launch.command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let mut command = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/journald.sh"),
    );
    command.arg(journal.path()).args(&worker_cmd);
    crate::support::clean_env(&mut command);
    launch.command = command;
    let mut worker = launch.start().await;

    let err = worker
        .api()
        .await
        .prove(request(ProofType::Transaction, vec![9; 16]))
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument);
    worker.signal(Signal::SIGTERM);
    assert!(worker.wait(START_TIMEOUT).await.success(), "{}", worker.output());

    let entries: Vec<serde_json::Value> = std::fs::read_to_string(journal.path())
        .expect("journal dump")
        .lines()
        .map(|l| serde_json::from_str(l).expect("journal JSON"))
        .collect();
    let field =
        |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let started = entries
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("worker listening on")))
        .unwrap_or_else(|| panic!("no start line in {entries:#?}"));
    assert_eq!(field(started, "PRIORITY").as_deref(), Some("6"));
    assert_eq!(field(started, "SYSLOG_IDENTIFIER").as_deref(), Some("miden-prover"));
    assert_eq!(field(started, "PROOF_TYPE").as_deref(), Some("transaction"));
    let failed = entries
        .iter()
        .find(|e| field(e, "MESSAGE").as_deref() == Some("proof failed"))
        .unwrap_or_else(|| panic!("no 'proof failed' line in {entries:#?}"));
    assert_eq!(field(failed, "PRIORITY").as_deref(), Some("4"));
    assert_eq!(field(failed, "OUTCOME").as_deref(), Some("invalid_payload"));
    assert_eq!(field(failed, "SPAN_NAME").as_deref(), Some("prove"), "span recorded");
    assert_eq!(field(failed, "PROOF_TYPE").as_deref(), Some("transaction"), "span field");
    assert!(field(failed, "ERROR").is_some_and(|e| e.contains("TransactionInputs")));
}

#[tokio::test]
async fn grpc_web_over_http1_reaches_the_worker() {
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let worker = Launch::worker("batch").start().await;
    let mut stream = tokio::net::TcpStream::connect(worker.addr).await.expect("connect");
    let head = format!(
        "POST /remote_prover.WorkerStatusApi/Status HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: 5\r\n\
         Connection: close\r\n\r\n",
        worker.addr
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    stream.write_all(&[0, 0, 0, 0, 0]).await.expect("send the empty message frame");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read the response");

    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/grpc-web+proto"), "{head}");
    let mut body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    // gRPC-web frames: flag byte, 4-byte big-endian length, data; flag 0x80 marks trailers.
    let mut frames = Vec::new();
    let mut rest = &body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        frames.push((rest[0], rest[5..5 + len].to_vec()));
        rest = &rest[5 + len..];
    }
    let (_, data) = frames.iter().find(|(flag, _)| *flag == 0).expect("a data frame");
    let status = miden_proving_service::proto::WorkerStatus::decode(&data[..]).expect("decode");
    assert_eq!(status.supported_proof_type, ProofType::Batch as i32);
    let (_, trailers) = frames.iter().find(|(flag, _)| *flag == 0x80).expect("a trailer frame");
    assert!(String::from_utf8_lossy(trailers).contains("grpc-status:0"), "{trailers:?}");
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).expect("ascii"), 16)
                .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[line_end + 2..line_end + 2 + size]);
        body = &body[line_end + 2 + size + 2..];
    }
}
