//! TLS from the PEM files an operator already has: the worker's port and the proxy's main port
//! serve it ([`ServerTls`]), a worker can require a client certificate (mutual TLS), and the
//! proxy checks `https://` workers against a CA file and can present a certificate of its own
//! ([`ClientTls`]).
//!
//! Files are read with the configuration, at start and at every reload, and a value here is
//! equal to another only when their files hold the same bytes: a renewed certificate is a change
//! that a reload applies (new connections get it; open ones keep theirs), an unchanged one is
//! not. rustls with the ring provider throughout, chosen explicitly so no process-wide default
//! is needed.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::telemetry::{LogEvery, more_since};

/// The protocols offered in ALPN: gRPC over HTTP/2, gRPC-web over HTTP/1.1.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates read from one PEM file (a chain, leaf first; or a CA bundle).
#[derive(Clone)]
pub struct Certificates {
    der: Vec<CertificateDer<'static>>,
    pem: Arc<[u8]>,
}

impl Certificates {
    /// Reads `path`, which must hold at least one PEM certificate.
    pub fn read(path: &Path) -> Result<Self, String> {
        let pem = read(path)?;
        let der = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("{}: not a PEM certificate file: {err}", path.display()))?;
        if der.is_empty() {
            return Err(format!("{}: holds no PEM certificate", path.display()));
        }
        Ok(Certificates { der, pem: pem.into() })
    }

    fn roots(&self, path_for_errors: &str) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        for cert in &self.der {
            roots.add(cert.clone()).map_err(|err| {
                format!("{path_for_errors}: a certificate is not usable as a CA: {err}")
            })?;
        }
        Ok(roots)
    }
}

/// A private key read from one PEM file (PKCS#8, PKCS#1 or SEC1).
pub struct PrivateKey {
    der: PrivateKeyDer<'static>,
    pem: Arc<[u8]>,
}

impl Clone for PrivateKey {
    fn clone(&self) -> Self {
        PrivateKey { der: self.der.clone_key(), pem: Arc::clone(&self.pem) }
    }
}

impl PrivateKey {
    /// Reads `path`, which must hold a PEM private key.
    pub fn read(path: &Path) -> Result<Self, String> {
        let pem = read(path)?;
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|err| format!("{}: holds no PEM private key: {err}", path.display()))?;
        Ok(PrivateKey { der, pem: pem.into() })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// A digest of files' bytes: what makes two TLS settings equal.
fn fingerprint(parts: &[Option<&[u8]>]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        let part = part.unwrap_or_default();
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

// SERVER
// ================================================================================================

/// A listener's TLS: its certificate chain and key, and the CA that clients' certificates must
/// chain to when it requires them.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    mutual: bool,
    fingerprint: [u8; 32],
}

impl ServerTls {
    /// Serves `chain` with `key`; with `client_ca`, only clients presenting a certificate that
    /// chains to it complete the handshake.
    pub fn new(
        chain: &Certificates,
        key: &PrivateKey,
        client_ca: Option<&Certificates>,
    ) -> Result<Self, String> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(ca.roots("the client CA file")?),
                    provider(),
                )
                .build()
                .map_err(|err| format!("the client CA file cannot verify clients: {err}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain.der.clone(), key.der.clone_key())
            .map_err(|err| format!("the certificate and the key do not go together: {err}"))?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let fingerprint =
            fingerprint(&[Some(&chain.pem), Some(&key.pem), client_ca.map(|ca| &ca.pem[..])]);
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            mutual: client_ca.is_some(),
            fingerprint,
        })
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// Completes the TLS handshake of `tcp` by `deadline`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        deadline: tokio::time::Instant,
    ) -> Result<TlsStream<TcpStream>, String> {
        match tokio::time::timeout_at(deadline, self.acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => Err(format!("TLS handshake failed: {err}")),
            Err(_) => Err("the TLS handshake did not complete within handshake_timeout".into()),
        }
    }
}

/// How often a refused TLS connection is logged at warn, at most.
pub const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// A listener's refused TLS connections (a failed or timed-out handshake: no client certificate,
/// one from another CA, cleartext on a TLS port). One is logged at warn, naming the client and
/// the reason, at most every [`REFUSALS_LOGGED_EVERY`]: a proxy refused by its worker is a
/// misconfiguration the operator must find in the worker's journal, but a scanner must not fill
/// it. The others go to debug and are counted in the next warn line.
pub struct Refusals(LogEvery);

impl Default for Refusals {
    fn default() -> Self {
        Refusals(LogEvery::new(REFUSALS_LOGGED_EVERY))
    }
}

impl Refusals {
    /// Logs or counts one refusal.
    pub fn refused(&self, client: SocketAddr, reason: &str) {
        if let Some(unlogged) = self.0.occurred() {
            let more = more_since(unlogged);
            tracing::warn!(%client, unlogged, "refused a TLS connection from {client}: {reason}{more}");
        } else {
            tracing::debug!(%client, "refused a TLS connection: {reason}");
        }
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for ServerTls {}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

/// The current TLS of a listener, swapped by a reload; `None` serves plaintext.
#[derive(Clone, Default)]
pub struct ServerTlsCell(Arc<std::sync::RwLock<Option<ServerTls>>>);

impl ServerTlsCell {
    /// A cell holding `tls`.
    pub fn new(tls: Option<ServerTls>) -> Self {
        ServerTlsCell(Arc::new(std::sync::RwLock::new(tls)))
    }

    /// What a connection accepted now is served with.
    pub fn current(&self) -> Option<ServerTls> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Serves connections accepted from now on with `tls`.
    pub fn set(&self, tls: Option<ServerTls>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
    }
}

// CLIENT
// ================================================================================================

/// How the proxy connects to `https://` workers: the CA their certificates must chain to (the
/// system's roots without one) and the certificate it presents to workers that require one.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<Certificates>,
    identity: Option<(Certificates, PrivateKey)>,
    fingerprint: [u8; 32],
    /// The `Prove` connections' connector, made at the first `https://` connection (so the
    /// system's roots are read only when a worker needs them) and shared by every clone. A
    /// failure is not kept: the next connection tries again.
    connector: Arc<OnceLock<TlsConnector>>,
}

impl ClientTls {
    /// Checks that the files make a working client configuration.
    pub fn new(
        ca: Option<Certificates>,
        identity: Option<(Certificates, PrivateKey)>,
    ) -> Result<Self, String> {
        let roots = match &ca {
            Some(ca) => ca.roots("tls_worker_ca_file")?,
            None => RootCertStore::empty(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(roots);
        if let Some((chain, key)) = &identity {
            builder.with_client_auth_cert(chain.der.clone(), key.der.clone_key()).map_err(
                |err| format!("the client certificate and its key do not go together: {err}"),
            )?;
        }
        let fingerprint = fingerprint(&[
            ca.as_ref().map(|ca| &ca.pem[..]),
            identity.as_ref().map(|(chain, _)| &chain.pem[..]),
            identity.as_ref().map(|(_, key)| &key.pem[..]),
        ]);
        Ok(ClientTls { ca, identity, fingerprint, connector: Arc::default() })
    }

    /// tonic's configuration for one `https://` worker connection, whose handshake may take
    /// `timeout`.
    pub fn config(&self, timeout: Duration) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new().timeout(timeout);
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(&ca.pem[..])),
            None => config.with_native_roots(),
        };
        if let Some((chain, key)) = &self.identity {
            config = config.identity(Identity::from_pem(&chain.pem[..], &key.pem[..]));
        }
        config
    }
}

impl ClientTls {
    /// The connector for `https://` worker connections' `Prove` calls: the CA file's
    /// certificates (the system's roots without one), the client certificate if any, and ALPN
    /// `h2` (a worker speaks gRPC over HTTP/2 only). Made at the first call that succeeds.
    pub fn connector(&self) -> Result<TlsConnector, String> {
        if let Some(made) = self.connector.get() {
            return Ok(made.clone());
        }
        let made = self.make_connector()?;
        Ok(self.connector.get_or_init(|| made).clone())
    }

    fn make_connector(&self) -> Result<TlsConnector, String> {
        let roots = if let Some(ca) = &self.ca {
            ca.roots("tls_worker_ca_file")?
        } else {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(format!(
                    "no system CA certificates to check the worker's against ({:?}); set \
                     tls_worker_ca_file",
                    native.errors
                ));
            }
            roots
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.der.clone(), key.der.clone_key())
                .map_err(|err| err.to_string())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for ClientTls {}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

// STREAMS
// ================================================================================================

/// A served connection: plain TCP, or TLS over it.
pub enum MaybeTls {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS, handshake done.
    Tls(Box<TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(tcp) => tcp,
            MaybeTls::Tls(tls) => tls.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            MaybeTls::Plain($stream) => {
                let $stream = std::pin::Pin::new($stream);
                $call
            }
            MaybeTls::Tls($stream) => {
                let $stream = std::pin::Pin::new(&mut **$stream);
                $call
            }
        }
    };
}

impl tokio::io::AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(tcp) => tcp.is_write_vectored(),
            MaybeTls::Tls(tls) => tls.is_write_vectored(),
        }
    }
}
