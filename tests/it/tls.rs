//! TLS on every hop, with certificates made by `openssl` as an operator would: the upstream client
//! crate proves through a TLS proxy port, the proxy reaches an `https://` worker that requires its
//! client certificate, a proxy without that certificate is refused, and certificates replaced on
//! disk are served after a reload, without a restart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use miden_objects::utils::Serializable;
use nix::sys::signal::Signal;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::certs::{make_ca, make_cert};
use crate::support::fixtures::sample_transactions;
use crate::support::{Daemon, Launch, START_TIMEOUT, example};

/// A gRPC health check over TLS that trusts only `ca`; the error's text when it fails.
async fn health_over_tls(port: u16, ca: &Path, identity: Option<&Path>) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("CA file")));
    if let Some(name) = identity {
        let read = |ext: &str| std::fs::read(name.with_extension(ext)).expect("identity file");
        tls = tls.identity(Identity::from_pem(read("pem"), read("key")));
    }
    let channel: Channel = Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS settings")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|err| format!("{err:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(drop)
        .map_err(|status| format!("{status:?}"))
}

/// Swaps `NAME.pem`/`NAME.key` for `other`'s files, as a certificate renewal does.
fn replace_cert(dir: &Path, name: &str, other: &str) {
    for ext in ["pem", "key"] {
        std::fs::copy(dir.join(format!("{other}.{ext}")), dir.join(format!("{name}.{ext}")))
            .expect("replace the certificate");
    }
}

/// Sends SIGHUP and waits for the reload's `READY=1`; returns its line.
async fn reload(daemon: &mut Daemon) -> String {
    let before = daemon.notify.messages().len();
    daemon.signal(Signal::SIGHUP);
    let reloading = daemon.notify.wait_for_line("RELOADING=1", before, START_TIMEOUT).await;
    let ready = daemon.notify.wait_for_line("READY=1", reloading + 1, START_TIMEOUT).await;
    daemon.notify.messages()[ready].text.clone()
}

#[tokio::test]
async fn every_hop_speaks_tls_mutual_tls_keeps_other_proxies_out_and_reload_renews() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path();
    make_ca(dir, "ca");
    make_ca(dir, "ca2");
    for (name, ca) in
        [("worker", "ca"), ("front", "ca"), ("proxy-client", "ca"), ("renewed", "ca2")]
    {
        make_cert(dir, name, ca, &[]);
    }
    let file = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();

    // A worker that serves TLS and admits only clients with a certificate from `ca`.
    let mut launch = Launch::worker("transaction");
    launch.command.envs([
        ("MPS_WORKER_TLS_CERT_FILE", file("worker.pem")),
        ("MPS_WORKER_TLS_KEY_FILE", file("worker.key")),
        ("MPS_WORKER_TLS_CLIENT_CA_FILE", file("ca.pem")),
    ]);
    let mut worker = launch.start().await;
    worker.wait_for_output("mutual TLS", START_TIMEOUT).await;
    let https_worker = format!("https://localhost:{}", worker.addr.port());

    // The proxy: TLS on its main port, the worker checked against `ca`, its client certificate.
    let mut launch = Launch::proxy_for("transaction", &[]);
    launch.command.arg(&https_worker).envs([
        ("MPS_TLS_CERT_FILE", file("front.pem")),
        ("MPS_TLS_KEY_FILE", file("front.key")),
        ("MPS_TLS_WORKER_CA_FILE", file("ca.pem")),
        ("MPS_TLS_CLIENT_CERT_FILE", file("proxy-client.pem")),
        ("MPS_TLS_CLIENT_KEY_FILE", file("proxy-client.key")),
    ]);
    let mut proxy = launch.start_proxy().await;
    proxy.wait_healthy(1, 1).await;
    let status = proxy.status_json().await;
    // `localhost` is a name: the worker is its address, checked against the name's certificate.
    assert_eq!(status["workers"][0]["name"], https_worker.as_str(), "{status}");
    let dialled = format!("https://127.0.0.1:{}", worker.addr.port());
    assert_eq!(status["workers"][0]["address"], dialled.as_str(), "{status}");

    // A proxy that trusts the worker but has no client certificate: the worker refuses it (with
    // TLS 1.3 the refusal comes as the connection closing after the handshake), so it never
    // finds the worker healthy, over five health intervals.
    let mut launch = Launch::proxy_for("transaction", &[]);
    launch.command.arg(&https_worker).env("MPS_TLS_WORKER_CA_FILE", file("ca.pem"));
    let outsider = launch.start_proxy().await;
    let (mut unhealthy, mut hinted, mut reasons) = (0, 0, std::collections::BTreeSet::new());
    for _ in 0..10 {
        let status = outsider.status_json().await;
        let health = &status["workers"][0]["status"];
        assert_ne!(health, "Healthy", "a proxy without a client certificate got in: {status}");
        if let Some(reason) = health["Unhealthy"]["reason"].as_str() {
            unhealthy += 1;
            // Whether the refusal arrived as an alert or as the connection closing, the reason
            // says what to check (each shape of it: `proxy::health`'s unit test).
            hinted += usize::from(reason.contains("tls_client_cert_file"));
            reasons.insert(reason.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unhealthy > 0, "the refused worker is reported unhealthy with a reason");
    assert!(hinted > 0, "no reason says to check the client certificate: {reasons:?}");
    // A client with no certificate is refused directly too; one with the proxy's is served.
    let port = worker.addr.port();
    health_over_tls(port, &dir.join("ca.pem"), None).await.expect_err("no client certificate");
    // The worker's journal says whom it refused and why (at most a line a minute).
    worker.wait_for_output("refused a TLS connection from 127.0.0.1", START_TIMEOUT).await;
    health_over_tls(port, &dir.join("ca.pem"), Some(&dir.join("proxy-client")))
        .await
        .expect("mTLS");

    // miden-remote-prover-client 0.12, unchanged, proves through the TLS port; it trusts the
    // system's roots, which SSL_CERT_FILE names here.
    let sample = sample_transactions(1).await.expect("sample transaction");
    let inputs = dir.join("tx.inputs");
    std::fs::write(&inputs, sample.inputs[0].to_bytes()).expect("write the inputs");
    let endpoint = format!("https://localhost:{}", proxy.daemon.addr.port());
    let output = Command::new(example("prove_file"))
        .args(["remote", &endpoint, inputs.to_str().expect("utf-8")])
        .env("SSL_CERT_FILE", dir.join("ca.pem"))
        .output()
        .expect("run prove_file");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{said}{}", String::from_utf8_lossy(&output.stderr));
    assert!(said.contains("the proof verifies"), "{said}");
    // Cleartext gRPC to the TLS port gets no answer.
    let plain = Endpoint::from_shared(proxy.daemon.endpoint()).expect("endpoint");
    let plain = tokio::time::timeout(Duration::from_secs(5), async {
        HealthClient::new(plain.connect().await.map_err(|e| e.to_string())?)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert!(!matches!(plain, Ok(Ok(_))), "cleartext was answered on the TLS port");
    proxy.daemon.wait_for_output("refused a TLS connection from 127.0.0.1", START_TIMEOUT).await;

    // Renewal: the proxy's and the worker's certificates are replaced by ones from `ca2`; after
    // a reload new connections get them, with no restart.
    let (proxy_port, ca2) = (proxy.daemon.addr.port(), dir.join("ca2.pem"));
    health_over_tls(proxy_port, &ca2, None).await.expect_err("not yet renewed");
    replace_cert(dir, "front", "renewed");
    replace_cert(dir, "worker", "renewed");
    let ready = reload(&mut proxy.daemon).await;
    assert!(!ready.contains("reload failed"), "{ready}");
    health_over_tls(proxy_port, &ca2, None)
        .await
        .expect("the proxy serves the renewed certificate");
    health_over_tls(proxy_port, &dir.join("ca.pem"), None).await.expect_err("the old one is gone");
    let client = Some(dir.join("proxy-client"));
    health_over_tls(port, &ca2, client.as_deref()).await.expect_err("worker not yet reloaded");
    let ready = reload(&mut worker).await;
    assert!(!ready.contains("reload failed"), "{ready}");
    health_over_tls(port, &ca2, client.as_deref()).await.expect("the worker's renewed certificate");
    assert!(worker.child.try_wait().expect("wait").is_none(), "the worker was not restarted");
}
