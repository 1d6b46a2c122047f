//! TLS (rustls) for the servers and every client: the gRPC server (through tonic), the HTTPS
//! API (its rustls configuration is made here, from the same PEM files), the CLI, and the
//! clients a split inference process keeps to its router. PEM files in; errors name the flag
//! and the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The crypto provider tonic uses too: the process default when one was installed, else ring
/// (the `tls-ring` feature roe builds tonic with).
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The certificates of a PEM file, refused when it holds none.
fn certificates(
    what: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Config(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Config(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The server's certificate chain and private key (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    let (cert_pem, key_pem) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
    if !String::from_utf8_lossy(&cert_pem).contains("BEGIN CERTIFICATE") {
        return Err(TlsError::Config(format!(
            "--tls-cert {}: no PEM certificate in it",
            cert.display()
        )));
    }
    if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY") {
        return Err(TlsError::Config(format!(
            "--tls-key {}: no PEM private key in it",
            key.display()
        )));
    }
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
}

/// The HTTPS API's rustls configuration (the HTTP server sets its ALPN protocols).
pub type HttpsConfig = Arc<rustls::ServerConfig>;

/// The HTTPS API's configuration from the gRPC server's PEM files (`--tls-cert`,
/// `--tls-key`), so that one certificate serves both. A key that is not the certificate's is
/// refused here, at start, rather than at every handshake.
pub fn https_config(cert: &Path, key: &Path) -> Result<HttpsConfig, TlsError> {
    let (cert_pem, key_pem) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
    let chain = certificates("--tls-cert", cert, &cert_pem)?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsError::Config(format!(
            "--tls-key {}: no PEM private key in it ({e})",
            key.display()
        ))
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| {
            TlsError::Config(format!(
                "--tls-cert {} with --tls-key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(config))
}

/// How a client checks the server over `https://`: the system's roots, plus a private CA
/// (`--tls-ca`), and the name the certificate must carry when the URL has another
/// (`--tls-domain`, e.g. `localhost` for `https://127.0.0.1:50051`).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Set with `--tls-ca`: the system's roots and the file's certificates, which also pins a
    /// self-signed server certificate that is in the file.
    verifier: Option<Arc<PinningVerifier>>,
    domain: Option<String>,
}

impl ClientTls {
    pub fn new(ca: Option<&Path>, domain: Option<&str>) -> Result<Self, TlsError> {
        let verifier = match ca {
            Some(path) => Some(Arc::new(PinningVerifier::new(
                path,
                &read("--tls-ca", path)?,
            )?)),
            None => None,
        };
        Ok(Self {
            verifier,
            domain: domain.filter(|d| !d.is_empty()).map(str::to_owned),
        })
    }

    /// Whether anything was configured (then the URL must be https).
    pub fn is_configured(&self) -> bool {
        self.verifier.is_some() || self.domain.is_some()
    }

    /// `endpoint` with TLS when its URL is https (an http URL with TLS configured is refused:
    /// the caller meant to encrypt).
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, TlsError> {
        let https = endpoint.uri().scheme_str() == Some("https");
        if !https {
            if self.is_configured() {
                return Err(TlsError::Config(format!(
                    "{}: --tls-ca/--tls-domain need an https:// URL",
                    endpoint.uri()
                )));
            }
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        let uri = endpoint.uri().to_string();
        let configured = match &self.verifier {
            // tonic's own verifier (WebPKI over the roots) would refuse a self-signed server
            // certificate made as a CA, as `openssl req -x509` makes them: see PinningVerifier.
            Some(verifier) => {
                let verifier: Arc<dyn ServerCertVerifier> = verifier.clone();
                endpoint.tls_config_with_verifier(config, verifier)
            }
            None => endpoint.tls_config(config.with_native_roots()),
        };
        configured.map_err(|e| TlsError::Config(format!("{uri}: {e}")))
    }
}

/// WebPKI verification over the system's roots and the `--tls-ca` file's certificates, which
/// also accepts a server whose certificate is, byte for byte, one of that file's.
///
/// Why: the README's promise that a self-signed server certificate given with `--tls-ca`
/// works. `openssl req -x509` (the usual way to make one) marks it `CA:TRUE`, and WebPKI
/// refuses a CA certificate as the server's own (`CaUsedAsEndEntity`) even when it is the
/// trust anchor. Pinning that exact certificate is at least as strict as trusting it as a
/// root: only the holder of its key can complete the handshake (whose signatures are still
/// checked by the provider's algorithms, below), and the name is still checked. The validity
/// period is checked too: WebPKI reads it before the basic constraints, so a
/// `CaUsedAsEndEntity` refusal means the dates passed (`tests/grpc_tls.rs` holds an expired
/// pinned certificate to that). Any other refusal stands.
#[derive(Debug)]
struct PinningVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl PinningVerifier {
    fn new(path: &Path, pem: &[u8]) -> Result<Self, TlsError> {
        let pinned = certificates("--tls-ca", path, pem)?;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(pinned.iter().cloned());
        if added == 0 {
            return Err(TlsError::Config(format!(
                "--tls-ca {}: none of its certificates could be read",
                path.display()
            )));
        }
        // The system's roots as well, as without --tls-ca (tonic's `with_native_roots`);
        // a machine without any still trusts the file.
        let native = rustls_native_certs::load_native_certs();
        if !native.errors.is_empty() {
            tracing::debug!(errors = ?native.errors, "some of the system's root certificates could not be loaded");
        }
        roots.add_parsable_certificates(native.certs);
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Config(format!("--tls-ca {}: {e}", path.display())))?;
        Ok(Self { webpki, pinned })
    }

    fn is_pinned(&self, end_entity: &CertificateDer<'_>) -> bool {
        let presented: &[u8] = end_entity.as_ref();
        self.pinned.iter().any(|c| {
            let pinned: &[u8] = c.as_ref();
            pinned == presented
        })
    }
}

/// WebPKI's refusal of a CA certificate as the server's own (rustls passes it on as an
/// `Other` certificate error holding webpki's).
fn is_ca_used_as_end_entity(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => return Ok(verified),
            Err(e) => e,
        };
        if !is_ca_used_as_end_entity(&refused) || !self.is_pinned(end_entity) {
            return Err(refused);
        }
        // WebPKI stopped before the name; check it as it would have.
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        tracing::debug!(
            server = ?server_name,
            "the server's self-signed CA certificate is the one given with --tls-ca: accepted as pinned"
        );
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
