//! TLS (rustls through tonic) for the server and every client: the CLI, and the clients a
//! split inference process keeps to its router. PEM files in; errors name the file.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

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

/// How a client checks the server over `https://`: the system's roots, plus a private CA
/// (`--tls-ca`), and the name the certificate must carry when the URL has another
/// (`--tls-domain`, e.g. `localhost` for `https://127.0.0.1:50051`).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    ca_pem: Option<Vec<u8>>,
    domain: Option<String>,
}

impl ClientTls {
    pub fn new(ca: Option<&Path>, domain: Option<&str>) -> Result<Self, TlsError> {
        Ok(Self {
            ca_pem: ca.map(|p| read("--tls-ca", p)).transpose()?,
            domain: domain.filter(|d| !d.is_empty()).map(str::to_owned),
        })
    }

    /// Whether anything was configured (then the URL must be https).
    pub fn is_configured(&self) -> bool {
        self.ca_pem.is_some() || self.domain.is_some()
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
        let mut config = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &self.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        let uri = endpoint.uri().to_string();
        endpoint
            .tls_config(config)
            .map_err(|e| TlsError::Config(format!("{uri}: {e}")))
    }
}
