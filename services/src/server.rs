//! Assembles the gRPC server: library and router services, the inference and answer
//! services when a backbone is loaded, gRPC health and reflection.

use std::net::SocketAddr;
use std::sync::Arc;

use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::retrieval::RouteOptions;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::answer_service::{AnswerService, LocalRouteClient, RouteClient};
use crate::inference_service::InferenceService;
use crate::library_service::LibraryService;
use crate::proto::{
    answerer_server::AnswererServer, expert_library_server::ExpertLibraryServer,
    inference_server::InferenceServer, router_server::RouterServer,
};
use crate::router_service::RouterService;

/// Largest gRPC message accepted: adapters of small backbones fit in one unary request;
/// larger ones use `RegisterExpertStream`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
pub struct ServeOptions {
    pub route_defaults: RouteOptions,
    /// The `roe.v1.Inference` service (None: not served, nor is `roe.v1.Answerer`).
    pub inference: Option<Arc<InferenceService>>,
    /// Answers when routing abstains in `roe.v1.Answerer` (empty: the bare backbone). Check
    /// it with [`InferenceService::check_expert`] before serving.
    pub fallback_expert: String,
    /// How `roe.v1.Answerer` routes (None: the local library with `route_defaults`).
    pub route_client: Option<Arc<dyn RouteClient>>,
}

/// gRPC reflection over roe's and the health service's descriptors.
fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid")
}

/// `roe.v1.Answerer` over `inference`, routing through `router`.
fn answerer(
    inference: Arc<InferenceService>,
    router: Arc<dyn RouteClient>,
    fallback_expert: String,
) -> AnswererServer<AnswerService> {
    AnswererServer::new(AnswerService::new(inference, router, fallback_expert))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    library: Arc<ExpertLibrary>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ExpertLibraryServer<LibraryService>>()
        .await;
    health_reporter
        .set_serving::<RouterServer<RouterService>>()
        .await;
    if options.inference.is_some() {
        health_reporter
            .set_serving::<InferenceServer<InferenceService>>()
            .await;
        health_reporter
            .set_serving::<AnswererServer<AnswerService>>()
            .await;
    }
    let reflection = reflection();
    let library_api = ExpertLibraryServer::new(LibraryService::new(library.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let answer_api = options.inference.as_ref().map(|svc| {
        let router = options.route_client.clone().unwrap_or_else(|| {
            Arc::new(LocalRouteClient::new(
                library.clone(),
                options.route_defaults.clone(),
            ))
        });
        answerer(svc.clone(), router, options.fallback_expert.clone())
    });
    let persisted = library.clone();
    let router_api = RouterServer::new(RouterService::new(library, options.route_defaults))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let inference_api = options.inference.map(|svc| {
        InferenceServer::from_arc(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    });
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "roe serving");
    let served = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(library_api)
        .add_service(router_api)
        .add_optional_service(inference_api)
        .add_optional_service(answer_api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    // Graceful shutdown: keep the index graphs so that the next start reloads them instead of
    // rebuilding (a no-op when they did not change). Sled holds everything, so a failure only
    // costs the next start a rebuild.
    match tokio::task::spawn_blocking(move || persisted.persist_index()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("could not persist the index at shutdown: {e}"),
        Err(e) => tracing::warn!("persisting the index at shutdown failed: {e}"),
    }
    served
}

/// Serves inference only (`roe serve --role inference`): `roe.v1.Inference` over `inference`
/// (whose experts come from a library served by another process), `roe.v1.Answerer` when
/// `options.route_client` is set (routing then happens in that other process too), gRPC
/// health and reflection. `options.inference` and `options.route_defaults` are not used.
pub async fn serve_inference(
    listener: TcpListener,
    inference: Arc<InferenceService>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let answer_api = options
        .route_client
        .map(|router| answerer(inference.clone(), router, options.fallback_expert));
    if answer_api.is_some() {
        health_reporter
            .set_serving::<AnswererServer<AnswerService>>()
            .await;
    }
    let reflection = reflection();
    let inference_api = InferenceServer::from_arc(inference)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "roe serving inference only");
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference_api)
        .add_optional_service(answer_api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
