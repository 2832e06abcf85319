//! Hostile clients against a real proxy process: stalled uploads, idle connections past the
//! descriptor limit, forged `X-Forwarded-For`, overlong headers. Memory, descriptors and CPU are
//! read from `/proc` while the attack holds.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use miden_proving_service::proto::ProofType;
use miden_proving_service::proto::api_client::ApiClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::hostile::{cpu_ticks, fd_count, prlimited, rss_kib};
use crate::support::fixtures::sample_transactions;
use crate::support::requests::{request, tx_request, verify_tx};
use crate::support::{Launch, Proxy, START_TIMEOUT, standin};

const MIB: usize = 1 << 20;

/// Another client address: loopback is a whole /8.
fn other_client() -> IpAddr {
    "127.0.0.2".parse().expect("address")
}

/// A TCP connection to `to` from `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// A gRPC channel to the proxy from `from`.
async fn channel_from(from: IpAddr, proxy: &Proxy) -> Channel {
    Endpoint::from_shared(proxy.daemon.endpoint())
        .expect("endpoint")
        .local_address(Some(from))
        .connect()
        .await
        .expect("connect to the proxy")
}

/// `GET PATH` on `to` from `from`: the status code.
async fn get_from(from: IpAddr, to: SocketAddr, path: &str) -> u16 {
    let mut stream = connect_from(from, to).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status line")
}

/// The `grpc-status` of a gRPC-web answer read whole (until the proxy closed the connection).
fn grpc_web_status(response: &[u8]) -> Option<u32> {
    let text = String::from_utf8_lossy(response);
    let at = text.find("grpc-status:")?;
    text[at + "grpc-status:".len()..].split("\r\n").next()?.trim().parse().ok()
}

/// One attacker of the slow-body test: the headers of a gRPC-web `Prove` of `announced` bytes,
/// then `sent` bytes of its body, then silence. Returns what the proxy answered (read while
/// sending) once it closed the connection.
async fn stalled_upload(to: SocketAddr, announced: usize, sent: usize) -> Vec<u8> {
    let stream = TcpStream::connect(to).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut response = Vec::new();
        // A reset after the answer is expected: the proxy closes on a body it did not read.
        let _ = read.read_to_end(&mut response).await;
        response
    });
    let head = format!(
        "POST /remote_prover.Api/Prove HTTP/1.1\r\nHost: {to}\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
         Content-Length: {}\r\n\r\n",
        announced + 5
    );
    let writer = tokio::spawn(async move {
        let sending = async {
            write.write_all(head.as_bytes()).await?;
            let length = u32::try_from(announced).expect("below 4 GiB").to_be_bytes();
            write.write_all(&[0, length[0], length[1], length[2], length[3]]).await?;
            let chunk = vec![0x5a; MIB];
            let mut left = sent;
            while left > 0 {
                let n = left.min(MIB);
                write.write_all(&chunk[..n]).await?;
                left -= n;
            }
            Ok::<_, std::io::Error>(())
        };
        // Stalled: the write half stays open until the proxy gives up. A refused upload's
        // writes fail once the proxy has closed the connection.
        if sending.await.is_ok() {
            std::future::pending::<()>().await;
        }
    });
    let response = reader.await.expect("reader");
    writer.abort();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_stalled_64_mib_uploads_stay_under_300_mib_and_end_within_the_body_timeout() {
    let sample = sample_transactions(1).await.expect("sample transaction");
    let worker = Launch::worker("transaction").start().await;
    let mut launch = Launch::proxy("transaction", &[&worker]);
    // Requests as large as the attack's, so that the budgets, not the size limit, hold it.
    launch.command.envs([
        ("MPS_MAX_REQUEST_SIZE", "64MiB"),
        ("MPS_MAX_BUFFERED_PER_CLIENT", "64MiB"),
        ("MPS_REQUEST_TIMEOUT", "20s"),
    ]);
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let pid = proxy.daemon.pid;
    let rss_before = rss_kib(pid);

    let started = Instant::now();
    let attackers: Vec<_> = (0..30)
        .map(|_| tokio::spawn(stalled_upload(proxy.daemon.addr, 64 * MIB, 60 * MIB)))
        .collect();
    // While they hold: memory, the status page and a real proof from another client.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_during = rss_kib(pid);
    eprintln!("proxy VmRSS {rss_during} KiB during the attack (before: {rss_before} KiB)");
    assert!(rss_during < 300 * 1024, "VmRSS {rss_during} KiB while 30 uploads stall");
    assert_eq!(get_from(other_client(), proxy.status, "/status").await, 200);
    let mut api = ApiClient::new(channel_from(other_client(), &proxy).await);
    let request = tx_request(&sample.inputs[0]);
    let proof = api.prove(request).await.expect("a proof while the attack holds").into_inner();
    verify_tx(&proof.payload);
    assert!(rss_kib(pid) < 300 * 1024);

    // Each ends with a status: refused at once (the client's budget is full) or, for the one
    // admitted, DEADLINE_EXCEEDED at request_timeout.
    let mut codes = Vec::new();
    for attacker in attackers {
        let response = tokio::time::timeout(Duration::from_secs(40), attacker)
            .await
            .expect("every stalled upload ends within the body timeout")
            .expect("attacker");
        let code = grpc_web_status(&response).unwrap_or_else(|| {
            panic!("no grpc-status in {:?}", String::from_utf8_lossy(&response))
        });
        codes.push(code);
    }
    eprintln!("the stalled uploads ended after {:?}: codes {codes:?}", started.elapsed());
    let exhausted = codes.iter().filter(|c| **c == Code::ResourceExhausted as u32).count();
    let deadline = codes.iter().filter(|c| **c == Code::DeadlineExceeded as u32).count();
    assert_eq!(exhausted + deadline, 30, "{codes:?}");
    assert!(deadline >= 1, "the admitted upload times out: {codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_at_1024_descriptors_leave_the_proxy_serving() {
    // The test holds 2,000 sockets itself.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .expect("setrlimit");
    let (worker, _) = standin::start(env!("CARGO_PKG_VERSION"), Duration::from_millis(5)).await;
    let mut launch = Launch::proxy_for("transaction", &[worker]);
    launch.command.envs([
        ("MPS_HANDSHAKE_TIMEOUT", "3s"),
        // The total bound is what holds here: one address may take all of it.
        ("MPS_MAX_CONNECTIONS", "900"),
        ("MPS_MAX_CONNECTIONS_PER_CLIENT", "100000"),
    ]);
    let mut proxy = prlimited(launch, 1024).start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let pid = proxy.daemon.pid;
    // 900 connections and 256 workers need more than 1,024 descriptors: the operator is told.
    assert!(
        proxy.daemon.output().contains("need more descriptors than RLIMIT_NOFILE allows"),
        "{}",
        proxy.daemon.output()
    );

    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(proxy.daemon.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = fd_count(pid);
    eprintln!("proxy: {fds} descriptors with 2,000 idle connections");
    assert!(fds < 1000, "{fds} descriptors");
    let ticks = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(pid) - ticks;
    eprintln!("proxy CPU: {spent} ticks in 2 s while they hold");
    assert!(spent < 50, "the proxy spent {spent}/200 ticks of CPU: accepting spins");

    // Another client is served: status, a proof, and a short HTTP/1.0 request.
    assert_eq!(get_from(other_client(), proxy.status, "/status").await, 200);
    let mut api = ApiClient::new(channel_from(other_client(), &proxy).await);
    api.prove(request(ProofType::Transaction, vec![1]))
        .await
        .expect("served while 2,000 idle connections are open");
    let mut short = connect_from(other_client(), proxy.status).await.expect("connect");
    short.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("18 bytes");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), short.read_to_end(&mut answer))
        .await
        .expect("a request shorter than the HTTP/2 preface is answered")
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 404") || answer.starts_with(b"HTTP/1.0 404"),
        "{answer:?}"
    );

    // The idle ones are closed within handshake_timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut open = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(10), stream.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(_)) => panic!("an idle connection got data"),
            Err(_) => open += 1,
        }
    }
    assert_eq!(open, 0, "{open} idle connections still open after handshake_timeout");
    let fds_after = fd_count(pid);
    assert!(fds_after < 64, "{fds_after} descriptors after the idle connections were closed");
}

/// A gRPC `Prove` through the proxy with `headers`; the status it got.
async fn prove_with_headers(proxy: &Proxy, headers: &[(&'static str, &str)]) -> tonic::Status {
    let mut api = ApiClient::new(proxy.daemon.channel().await);
    let mut request = tonic::Request::new(request(ProofType::Transaction, vec![1]));
    for (key, value) in headers {
        request.metadata_mut().insert(*key, value.parse().expect("header value"));
    }
    api.prove(request).await.expect_err("no worker: every answer is an error")
}

#[tokio::test]
async fn a_forwarded_client_counts_only_from_a_trusted_forwarder_and_headers_are_logged_bounded() {
    for trusted in [false, true] {
        let mut launch = Launch::proxy_for("transaction", &[]);
        launch.command.env("MPS_MAX_REQ_PER_SEC", "1");
        if trusted {
            launch.command.env("MPS_TRUSTED_FORWARDERS", "[\"127.0.0.0/8\"]");
        }
        let mut proxy = launch.start_proxy().await;
        let from = |ip: &'static str| [("x-forwarded-for", ip)];
        let first = prove_with_headers(&proxy, &from("198.51.100.7")).await;
        assert_eq!(first.code(), Code::Unavailable, "no workers: {first:?}");
        let again = prove_with_headers(&proxy, &from("198.51.100.7")).await;
        assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
        let other = prove_with_headers(&proxy, &from("198.51.100.8")).await;
        if trusted {
            assert!(
                again.message().starts_with("Too many requests from 198.51.100.7"),
                "{again:?}"
            );
            assert_eq!(other.code(), Code::Unavailable, "its own bucket: {other:?}");
        } else {
            assert!(again.message().starts_with("Too many requests from 127.0.0.1"), "{again:?}");
            assert_eq!(other.code(), Code::ResourceExhausted, "the header is ignored: {other:?}");
        }

        if trusted {
            // A 900 KB x-request-id (HTTP/1.1 takes headers up to 1 MiB) leaves a bounded log.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let id = "r".repeat(900_000);
            let mut stream = TcpStream::connect(proxy.daemon.addr).await.expect("connect");
            let head = format!(
                "POST /remote_prover.Api/Prove HTTP/1.1\r\nHost: proxy\r\n\
                 Content-Type: application/grpc-web+proto\r\nX-Request-Id: {id}\r\n\
                 X-Forwarded-For: 198.51.100.9\r\nContent-Length: 7\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.expect("head");
            stream.write_all(&[0, 0, 0, 0, 2, 0x12, 0]).await.expect("body");
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.expect("answer");
            assert_eq!(grpc_web_status(&answer), Some(Code::Unavailable as u32));
            proxy.daemon.wait_for_output("198.51.100.9", START_TIMEOUT).await;
            let output = proxy.daemon.output();
            let longest = output.lines().map(str::len).max().unwrap_or(0);
            assert!(longest < 4096, "a log line of {longest} bytes");
            assert!(!output.contains("rrrrrrrr"), "the overlong request id was logged");
        }
    }
}

/// A gRPC-web `Prove` over HTTP/1.1 from `from`, after `prefix` (a PROXY protocol header); all the
/// proxy answered before it closed the connection.
async fn web_prove_after(from: IpAddr, to: SocketAddr, prefix: &[u8]) -> Vec<u8> {
    let mut stream = connect_from(from, to).await.expect("connect");
    let mut request = prefix.to_vec();
    request.extend_from_slice(
        b"POST /remote_prover.Api/Prove HTTP/1.1\r\nHost: proxy\r\n\
          Content-Type: application/grpc-web+proto\r\nContent-Length: 7\r\nConnection: close\r\n\r\n",
    );
    request.extend_from_slice(&[0, 0, 0, 0, 2, 0x12, 0]);
    stream.write_all(&request).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(START_TIMEOUT, stream.read_to_end(&mut answer)).await;
    answer
}

/// A PROXY protocol v2 header for a TCP4 connection from `client`.
fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend(client);
    header.extend([127, 0, 0, 1, 0x9c, 0x40, 0xc3, 0x53]);
    header
}

#[tokio::test]
async fn a_proxy_protocol_header_names_the_client_of_a_trusted_forwarder_only() {
    let mut launch = Launch::proxy_for("transaction", &[]);
    launch.command.env("MPS_MAX_REQ_PER_SEC", "1");
    launch.command.env("MPS_TRUSTED_FORWARDERS", "[\"127.0.0.1\"]");
    launch.command.env("MPS_PROXY_PROTOCOL", "true");
    let proxy = launch.start_proxy().await;
    let (forwarder, to) = ("127.0.0.1".parse().expect("address"), proxy.daemon.addr);
    let status_after = |answer: Vec<u8>| {
        let text = String::from_utf8_lossy(&answer).into_owned();
        (grpc_web_status(&answer), text)
    };
    let v1 = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 {}\r\n", to.port());

    // Version 1: the header's source is the client the rate limit counts.
    let (code, text) =
        status_after(web_prove_after(forwarder, to, v1("198.51.100.7").as_bytes()).await);
    assert_eq!(code, Some(Code::Unavailable as u32), "no workers: {text}");
    let (code, text) =
        status_after(web_prove_after(forwarder, to, v1("198.51.100.7").as_bytes()).await);
    assert_eq!(code, Some(Code::ResourceExhausted as u32), "{text}");
    assert!(text.contains("Too many requests from 198.51.100.7"), "{text}");
    // Version 2, another client: a bucket of its own.
    let (code, text) =
        status_after(web_prove_after(forwarder, to, &proxy_v2([198, 51, 100, 8])).await);
    assert_eq!(code, Some(Code::Unavailable as u32), "its own bucket: {text}");
    // LOCAL (a balancer's own health check): the forwarder is the client.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let (code, text) = status_after(web_prove_after(forwarder, to, local).await);
    assert_eq!(code, Some(Code::Unavailable as u32), "the forwarder's own bucket: {text}");
    // A trusted forwarder's connection without a header is closed unanswered.
    let answer = web_prove_after(forwarder, to, b"").await;
    assert!(answer.is_empty(), "answered: {}", String::from_utf8_lossy(&answer));
    // Anyone else is never read for a header: a client cannot name itself another.
    let (code, text) = status_after(web_prove_after(other_client(), to, b"").await);
    assert_eq!(code, Some(Code::Unavailable as u32), "an untrusted peer is its own client: {text}");
    let forged = web_prove_after(other_client(), to, v1("198.51.100.9").as_bytes()).await;
    assert_ne!(
        grpc_web_status(&forged),
        Some(Code::Unavailable as u32),
        "a forged header was read"
    );
}
