//! TLS end to end with a certificate made in the test: the server, a client that trusts it,
//! clients that do not, and the split-mode router client over https.

use std::sync::Arc;

use roe_expert_library::library::LibraryConfig;
use roe_services::proto::{self, expert_library_client::ExpertLibraryClient};
use roe_services::remote::{RemoteRouter, RemoteTimeouts};
use roe_services::tls::{server_config, ClientTls};
use roe_serving::{RouteOverrides, RouteService};
use roe_tests::{queries, register_request, task, ServerExtras, TestServer};
use tonic::transport::Endpoint;

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
