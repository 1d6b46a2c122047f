//! TLS end to end with a certificate made in the test: the server, a client that trusts it,
//! clients that do not, and the split-mode router client over https; and a self-signed
//! certificate as `openssl req -x509` makes it (marked CA:TRUE), which roe's client accepts
//! when it is the one given with `--tls-ca` (pinned), as the README promises.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use roe_expert_library::library::LibraryConfig;
use roe_services::proto::{self, expert_library_client::ExpertLibraryClient};
use roe_services::remote::{RemoteRouter, RemoteTimeouts};
use roe_services::tls::{server_config, ClientTls};
use roe_serving::{RouteOverrides, RouteService};
use roe_tests::{queries, register_request, task, ServerExtras, TestServer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

struct Made {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn certificate() -> Made {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    Made {
        _dir: dir,
        cert,
        key,
    }
}

async fn list(endpoint: Endpoint) -> Result<usize, String> {
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    ExpertLibraryClient::new(channel)
        .list_experts(proto::ListExpertsRequest::default())
        .await
        .map(|r| r.into_inner().experts.len())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_that_trust_the_certificate_get_through() {
    let made = certificate();
    let server = TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            tls: Some(server_config(&made.cert, &made.key).unwrap()),
            ..Default::default()
        },
    )
    .await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let trusting = ClientTls::new(Some(&made.cert), Some("localhost")).unwrap();
    let endpoint = || Endpoint::from_shared(server.url.clone()).unwrap();
    let channel = trusting.apply(endpoint()).unwrap().connect().await.unwrap();
    let mut lib = ExpertLibraryClient::new(channel);
    lib.register_expert(register_request("spam", "prompt", "sms_spam", 8))
        .await
        .unwrap();
    assert_eq!(list(trusting.apply(endpoint()).unwrap()).await, Ok(1));

    // Another certificate's CA does not vouch for this one.
    let other = certificate();
    let stranger = ClientTls::new(Some(&other.cert), Some("localhost")).unwrap();
    assert!(list(stranger.apply(endpoint()).unwrap()).await.is_err());
    // The right CA, the wrong name.
    let misnamed = ClientTls::new(Some(&made.cert), Some("roe.example")).unwrap();
    assert!(list(misnamed.apply(endpoint()).unwrap()).await.is_err());
    // Plaintext to the TLS port.
    let plain = Endpoint::from_shared(server.url.replace("https://", "http://")).unwrap();
    assert!(list(plain).await.is_err());
    // TLS options on a plaintext URL are refused, not ignored.
    let e = trusting
        .apply(Endpoint::from_shared("http://127.0.0.1:1").unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("need an https:// URL"), "{e}");

    // The split-mode router client speaks TLS too.
    let router = Arc::new(
        RemoteRouter::new(
            &server.url,
            RemoteTimeouts::default(),
            Default::default(),
            &trusting,
        )
        .unwrap(),
    );
    let routed = router
        .route(
            queries(&task("sms_spam"), 4, 1)
                .into_iter()
                .map(roe_services::convert::query_from_proto)
                .collect(),
            RouteOverrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(routed.winner().unwrap().expert_id, "spam");
}

#[test]
fn unreadable_or_wrong_files_name_the_flag() {
    let made = certificate();
    let missing = made.cert.with_file_name("missing.pem");
    let e = server_config(&missing, &made.key).unwrap_err();
    assert!(e.to_string().starts_with("--tls-cert"), "{e}");
    // A key where the certificate should be.
    let e = server_config(&made.key, &made.key).unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
    let e = ClientTls::new(Some(&missing), None).unwrap_err();
    assert!(e.to_string().starts_with("--tls-ca"), "{e}");
}

/// `openssl req -x509` as people run it to make a self-signed server certificate: with
/// OpenSSL's default configuration it is marked `CA:TRUE`.
fn openssl_self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .output()
        .expect("the openssl command line runs (this test uses the certificate it makes)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    // What this test is about: a CA certificate as the server's own.
    assert!(text.contains("CA:TRUE"), "{text}");
    (cert, key)
}

async fn tls_server(cert: &Path, key: &Path) -> TestServer {
    TestServer::start_with(
        LibraryConfig::default(),
        false,
        ServerExtras {
            tls: Some(server_config(cert, key).unwrap()),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openssl_self_signed_certificate_given_with_tls_ca_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = openssl_self_signed(dir.path());
    let server = tls_server(&cert, &key).await;
    let endpoint = || Endpoint::from_shared(server.url.clone()).unwrap();

    // WebPKI alone (tonic's verifier, what roe's client was) refuses it as the server's own.
    let pem = std::fs::read(&cert).unwrap();
    let webpki_only = endpoint()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("localhost"),
        )
        .unwrap();
    let e = list(webpki_only).await.unwrap_err();
    assert!(e.contains("CaUsedAsEndEntity"), "{e}");

    // roe's client accepts exactly that certificate: by its name, and by the IP address of
    // the URL (https://127.0.0.1:port, in its subjectAltName).
    let pinned = ClientTls::new(Some(&cert), Some("localhost")).unwrap();
    let channel = pinned.apply(endpoint()).unwrap().connect().await.unwrap();
    ExpertLibraryClient::new(channel)
        .register_expert(register_request("spam", "prompt", "sms_spam", 8))
        .await
        .unwrap();
    let by_ip = ClientTls::new(Some(&cert), None).unwrap();
    assert_eq!(list(by_ip.apply(endpoint()).unwrap()).await, Ok(1));
    // A name the certificate does not carry is still refused.
    let misnamed = ClientTls::new(Some(&cert), Some("roe.example")).unwrap();
    assert!(list(misnamed.apply(endpoint()).unwrap()).await.is_err());
    // Another self-signed certificate pins nothing here.
    let other = tempfile::tempdir().unwrap();
    let (stranger, _) = openssl_self_signed(other.path());
    let stranger = ClientTls::new(Some(&stranger), Some("localhost")).unwrap();
    assert!(list(stranger.apply(endpoint()).unwrap()).await.is_err());

    // The split inference process's router client, as `roe serve --role inference
    // --library-url https://... --tls-ca c.pem` makes it.
    let router = RemoteRouter::new(
        &server.url,
        RemoteTimeouts::default(),
        Default::default(),
        &by_ip,
    )
    .unwrap();
    let routed = router
        .route(
            queries(&task("sms_spam"), 4, 1)
                .into_iter()
                .map(roe_services::convert::query_from_proto)
                .collect(),
            RouteOverrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(routed.winner().unwrap().expert_id, "spam");
}

/// A CA certificate made to be the server's own, for `localhost`, valid from `not_before` to
/// `not_after` (year, month, day): its PEM certificate and key in `dir`.
fn ca_as_server(
    dir: &Path,
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let made = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, made.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_certificate_is_still_refused_when_expired() {
    let dir = tempfile::tempdir().unwrap();
    // In date: pinned, accepted (so what refuses the next one is its dates).
    let (cert, key) = ca_as_server(&dir.path().join("valid"), (2020, 1, 1), (4000, 1, 1));
    let server = tls_server(&cert, &key).await;
    let endpoint = Endpoint::from_shared(server.url.clone()).unwrap();
    let client = ClientTls::new(Some(&cert), Some("localhost")).unwrap();
    assert_eq!(list(client.apply(endpoint).unwrap()).await, Ok(0));

    let (cert, key) = ca_as_server(&dir.path().join("expired"), (2000, 1, 1), (2001, 1, 1));
    let server = tls_server(&cert, &key).await;
    let endpoint = Endpoint::from_shared(server.url.clone()).unwrap();
    let client = ClientTls::new(Some(&cert), Some("localhost")).unwrap();
    let e = list(client.apply(endpoint).unwrap()).await.unwrap_err();
    assert!(e.contains("Expired"), "{e}");
}
