//! HTTPS for the HTTP API: the gRPC server's certificate (`--tls-cert`, `--tls-key`) on the
//! HTTP listener, so that API keys and prompts never cross the network in clear when the
//! gRPC side is encrypted.
//!
//! A listener for `axum::serve`: TCP connections are accepted in a task of their own, each
//! handshake runs in its own task (a client that opens a connection and says nothing holds
//! back no one else, and is dropped after [`HANDSHAKE_TIMEOUT`]), and only connections that
//! completed their handshake reach axum. A failed handshake is the client's problem (a
//! plaintext request, an untrusted certificate): it is logged at debug and the listener goes
//! on. ALPN offers HTTP/2 and HTTP/1.1; hyper's automatic builder serves either.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for axum to take them (it takes each at once; the bound
/// only keeps a stalled server from piling them up).
const QUEUE: usize = 64;

/// The ALPN protocols offered, best first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A TCP listener whose connections come out as TLS streams (see the module's notes).
pub struct TlsListener {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` (needs a Tokio runtime).
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let mut config = (*config).clone();
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, accepted) = mpsc::channel(QUEUE);
        let accepting = tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(Self {
            local_addr,
            accepted,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    /// axum drops the listener when it stops accepting (graceful shutdown): the port closes
    /// then, not when the last handshake in progress gives up.
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // The listener is gone: stop accepting.
            _ = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, say: as axum's own listener, wait and go on rather
                // than spin.
                tracing::error!("accepting an HTTPS connection: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Nagle off, as for gRPC and plaintext HTTP: a small response is not held back for
        // the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY: {e}");
        }
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // An error means the server is shutting down: the connection just closes.
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => {
                    tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out")
                }
            }
        });
    }
}

/// Errors of one connection (the peer left before it was accepted), not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(conn) => conn,
            None => {
                // The accept loop holds a sender until this listener goes, so this is a panic
                // in it: no connection will come again.
                tracing::error!("the HTTPS accept loop ended; no new connections");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
    use tokio_rustls::TlsConnector;

    /// A certificate for `localhost`, written as PEM files and read back as `roe serve` reads
    /// them.
    fn certificate(dir: &Path) -> (roe_services::tls::HttpsConfig, CertificateDer<'static>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let config = roe_services::tls::https_config(&cert, &key).unwrap();
        (config, made.cert.der().clone())
    }

    fn connector(trusted: &CertificateDer<'static>, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    async fn connect(
        addr: SocketAddr,
        connector: &TlsConnector,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await
    }

    async fn body_text(response: http::Response<hyper::body::Incoming>) -> String {
        let bytes = axum::body::to_bytes(Body::new(response.into_body()), 1 << 16)
            .await
            .unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// GET /hello over HTTP/2, as a client offering h2 by ALPN gets it.
    async fn get_h2(tls: TlsStream<TcpStream>) -> (http::Version, String) {
        let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
            TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("https://localhost/hello")
            .body(Body::empty())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        (response.version(), body_text(response).await)
    }

    /// GET /hello over HTTP/1.1.
    async fn get_h1(tls: TlsStream<TcpStream>) -> (http::Version, String) {
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/hello")
            .header(http::header::HOST, "localhost")
            .body(Body::empty())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        (response.version(), body_text(response).await)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_serves_h2_and_http1_and_outlives_failed_handshakes() {
        let dir = tempfile::tempdir().unwrap();
        let (config, cert) = certificate(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/hello", get(|| async { "hello" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::serve_app(listener, app, Some(config), async move {
            let _ = stopped.await;
        }));

        // ALPN h2 first: HTTP/2.
        let tls = connect(addr, &connector(&cert, &super::ALPN))
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            get_h2(tls).await,
            (http::Version::HTTP_2, "hello".to_string())
        );
        // A client that offers only HTTP/1.1 (or nothing) gets HTTP/1.1.
        let offers: [&[&[u8]]; 2] = [&[&b"http/1.1"[..]], &[]];
        for alpn in offers {
            let tls = connect(addr, &connector(&cert, alpn)).await.unwrap();
            assert_eq!(
                get_h1(tls).await,
                (http::Version::HTTP_11, "hello".to_string())
            );
        }

        // Plaintext HTTP to the TLS port gets no HTTP answer.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
            .await
            .expect("the server closes a plaintext connection");
        assert!(
            !answer.starts_with(b"HTTP/"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // A client that trusts another certificate refuses this one.
        let other = tempfile::tempdir().unwrap();
        let (_, stranger) = certificate(other.path());
        assert!(connect(addr, &connector(&stranger, &super::ALPN))
            .await
            .is_err());
        // A client that connects and says nothing holds back no one.
        let _silent = TcpStream::connect(addr).await.unwrap();

        // The listener went on after each failed handshake.
        let tls = connect(addr, &connector(&cert, &super::ALPN))
            .await
            .unwrap();
        assert_eq!(get_h2(tls).await.1, "hello");

        // Graceful shutdown ends the server, and the port closes.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        let mut closed = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(closed, "the port still accepts after shutdown");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_naming_both_flags() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = roe_services::tls::https_config(&cert, &key).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("--tls-cert") && text.contains("--tls-key"),
            "{text}"
        );
        // A certificate where the key should be.
        let e = roe_services::tls::https_config(&cert, &cert).unwrap_err();
        assert!(e.to_string().starts_with("--tls-key"), "{e}");
        let e = roe_services::tls::https_config(&key, &key).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}
