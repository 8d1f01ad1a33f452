//! TLS on the scaler's gRPC port (rustls with ring).
//!
//! The serving certificate and key are PEM files, usually a Kubernetes
//! Secret mounted into the pod (cert-manager's `tls.crt`/`tls.key`). They
//! are read again every [`TlsConfig::reload_interval`]; when their content
//! changed and the new pair is valid, new handshakes get the new
//! certificate. Connections already open keep their session (nothing is
//! re-negotiated), so agent streams survive a rotation. A pair that does
//! not load (a half-written file, a key that does not match) is logged and
//! counted, and the current certificate stays.
//!
//! With a client CA, client certificates are verified against it; a client
//! without one may still authenticate with a bearer token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::error::ScalerError;
use crate::metrics::ScalerMetrics;

/// Where the serving certificate comes from and how clients are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle that client certificates are verified against; `None`:
    /// no client certificates are asked for.
    pub client_ca: Option<PathBuf>,
    /// How often the certificate files are checked for a new pair.
    pub reload_interval: Duration,
    /// Longest a TLS handshake may take before the connection is closed.
    pub handshake_timeout: Duration,
}

impl TlsConfig {
    /// Files `cert` and `key`, no client CA, checked every 5 s, 10 s handshakes.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            reload_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// A certificate chain and key as files held them.
struct Pair {
    key: Arc<CertifiedKey>,
    digest: Vec<u8>,
}

fn load_pair(config: &TlsConfig) -> Result<Pair, String> {
    let cert_pem = read(&config.cert, "certificate")?;
    let key_pem = read(&config.key, "key")?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&cert_pem);
    ctx.update(&key_pem);
    let digest = ctx.finish().as_ref().to_vec();
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate {}: {e}", config.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate {}: no PEM CERTIFICATE block",
            config.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("key {}: {e}", config.key.display()))?;
    let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        format!(
            "certificate {} and key {}: {e}",
            config.cert.display(),
            config.key.display()
        )
    })?;
    Ok(Pair {
        key: Arc::new(certified),
        digest,
    })
}

/// The serving certificate handed to each new handshake; swapped on reload.
pub(crate) struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    digest: RwLock<Vec<u8>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

impl CertStore {
    /// Reads the files again; true when a new pair was installed.
    fn reload(&self, config: &TlsConfig) -> Result<bool, String> {
        let pair = load_pair(config)?;
        let same = self
            .digest
            .read()
            .map(|d| *d == pair.digest)
            .unwrap_or(false);
        if same {
            return Ok(false);
        }
        if let Ok(mut current) = self.current.write() {
            *current = pair.key;
        }
        if let Ok(mut digest) = self.digest.write() {
            *digest = pair.digest;
        }
        Ok(true)
    }
}

/// The acceptor's configuration and the store its certificate comes from.
pub(crate) struct ServerTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) store: Arc<CertStore>,
}

fn tls_error(what: &str, message: impl std::fmt::Display) -> ScalerError {
    ScalerError::config(what, "", message.to_string())
}

/// Loads the certificate (an error names the file) and builds the acceptor.
pub(crate) fn server_tls(config: &TlsConfig) -> Result<ServerTls, ScalerError> {
    let pair = load_pair(config).map_err(|e| tls_error("--tls-cert/--tls-key", e))?;
    let store = Arc::new(CertStore {
        current: RwLock::new(pair.key),
        digest: RwLock::new(pair.digest),
    });
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("TLS", e))?;
    let builder = match &config.client_ca {
        Some(path) => {
            let pem = read(path, "client CA").map_err(|e| tls_error("--tls-client-ca", e))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| tls_error("--tls-client-ca", e))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_error("--tls-client-ca", e))?;
            }
            if roots.is_empty() {
                return Err(ScalerError::config(
                    "--tls-client-ca",
                    path.display().to_string(),
                    "a PEM file with at least one CA certificate",
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_error("--tls-client-ca", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(store.clone());
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        store,
    })
}

/// Checks the certificate files every `reload_interval` until shutdown.
pub(crate) async fn watch_files(
    config: TlsConfig,
    store: Arc<CertStore>,
    metrics: Arc<ScalerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(config.reload_interval) => {}
        }
        let files = config.clone();
        let s = store.clone();
        let result = tokio::task::spawn_blocking(move || s.reload(&files))
            .await
            .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
        match result {
            Ok(true) => {
                failing = false;
                metrics.certificate_reloaded(true);
                tracing::info!(cert = %config.cert.display(), "serving certificate reloaded; new connections get it");
            }
            Ok(false) => failing = false,
            Err(e) => {
                metrics.certificate_reloaded(false);
                if !failing {
                    tracing::warn!(error = %e, "the serving certificate files do not load; keeping the current certificate");
                }
                failing = true;
            }
        }
    }
}

/// The DNS names of a client certificate (its subjectAltName entries).
pub(crate) fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .map(|c| c.valid_dns_names().map(str::to_string).collect())
        .unwrap_or_default()
}
