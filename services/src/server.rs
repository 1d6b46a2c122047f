//! Assembles the gRPC servers of each role: the library and router services, the inference
//! and answer services when a backbone is loaded, gRPC health (following the workers) and
//! reflection.

use crate::proto::training_server::TrainingServer;
use crate::training_service::TrainingService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::retrieval::RouteOptions;
use roe_serving::{BackboneAnswerer, BackboneInference, LocalRouter, RouteService};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::answer_service::AnswerService;
use crate::auth::AuthLayer;
use crate::consistency::{Consistency, DEFAULT_MIN_SEQ_WAIT};
use crate::inference_service::InferenceService;
use crate::library_service::{LibraryService, UploadLimits};
use crate::load_shed::ConcurrencyLimitLayer;
use crate::message_limit::MessageLimitLayer;
use crate::proto::{
    answerer_server::AnswererServer, expert_library_server::ExpertLibraryServer,
    inference_server::InferenceServer, router_server::RouterServer,
};
use crate::request_metrics::RequestMetricsLayer;
use crate::router_service::RouterService;

/// Largest gRPC message accepted: adapters of small backbones fit in one unary request;
/// larger ones use `RegisterExpertStream`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How often health is brought in line with the workers.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

pub struct ServeOptions {
    pub route_defaults: RouteOptions,
    /// The serving core behind `roe.v1.Inference` (None: not served, nor is
    /// `roe.v1.Answerer`).
    pub inference: Option<Arc<BackboneInference>>,
    /// Answers when routing abstains in `roe.v1.Answerer` (empty: the bare backbone). Check
    /// it with [`roe_serving::Inference::check_expert`] before serving.
    pub fallback_expert: String,
    /// How `roe.v1.Answerer` routes (None: the local library with `route_defaults`).
    pub route_client: Option<Arc<dyn RouteService>>,
    /// The training queue behind `roe.v1.Training` (None: not served).
    pub training: Option<Arc<roe_trainer::TrainingJobs>>,
    /// API keys checked before every service (default: none, everything open).
    pub auth: AuthLayer,
    /// Requests in flight past which calls are refused with RESOURCE_EXHAUSTED (default: no
    /// bound; health is never refused).
    pub concurrency: ConcurrencyLimitLayer,
    /// Bytes of registrations in flight, how long one waits for room, streamed ones at once
    /// (default: no bound).
    pub uploads: UploadLimits,
    /// Serve over TLS with this identity (None: plaintext).
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// How long a read waits for this replica to apply its `min_library_seq` before
    /// UNAVAILABLE (`--min-seq-wait-ms`; default [`DEFAULT_MIN_SEQ_WAIT`], 2 s). Bounded by
    /// the call's deadline too. Not used by [`serve_inference`]: the library process waits.
    pub min_seq_wait: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            route_defaults: RouteOptions::default(),
            inference: None,
            fallback_expert: String::new(),
            route_client: None,
            training: None,
            auth: AuthLayer::default(),
            concurrency: ConcurrencyLimitLayer::default(),
            uploads: UploadLimits::default(),
            tls: None,
            min_seq_wait: DEFAULT_MIN_SEQ_WAIT,
        }
    }
}

/// A server builder, over TLS when `tls` is given.
fn builder(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<Server, tonic::transport::Error> {
    match tls {
        Some(tls) => Server::builder().tls_config(tls),
        None => Ok(Server::builder()),
    }
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

fn inference_api(
    inference: Arc<BackboneInference>,
    consistency: Consistency,
) -> InferenceServer<InferenceService> {
    InferenceServer::new(InferenceService::new(inference, consistency))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `roe.v1.Answerer` over `inference`, routing through `router`.
fn answer_api(
    inference: Arc<BackboneInference>,
    router: Arc<dyn RouteService>,
    fallback_expert: String,
    consistency: Consistency,
) -> AnswererServer<AnswerService> {
    let answerer = BackboneAnswerer::new(inference, router, fallback_expert);
    AnswererServer::new(AnswerService::new(Arc::new(answerer), consistency))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Which services depend on which workers, for health.
struct Workers {
    library: Option<Arc<ExpertLibrary>>,
    inference: Option<Arc<BackboneInference>>,
    answerer: bool,
}

impl Workers {
    /// Whether the encoder and the backbone's queues are up (true where not used).
    fn up(&self) -> (bool, bool) {
        let encoder = self
            .library
            .as_ref()
            .is_none_or(|l| l.encoder().is_healthy());
        let backbone = self.inference.as_ref().is_none_or(|i| i.is_healthy());
        (encoder, backbone)
    }

    /// Sets every service's health from `(encoder, backbone)`: the library's and router's
    /// services need the encoder, inference's the backbone's queues, the answerer both when
    /// routing is local; the overall status ("") needs everything.
    async fn report(&self, reporter: &HealthReporter, (encoder, backbone): (bool, bool)) {
        let status = |up: bool| {
            if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        if self.library.is_some() {
            for service in ["roe.v1.ExpertLibrary", "roe.v1.Router"] {
                reporter.set_service_status(service, status(encoder)).await;
            }
        }
        if self.inference.is_some() {
            reporter
                .set_service_status("roe.v1.Inference", status(backbone))
                .await;
        }
        if self.answerer {
            reporter
                .set_service_status("roe.v1.Answerer", status(encoder && backbone))
                .await;
        }
        reporter
            .set_service_status("", status(encoder && backbone))
            .await;
    }
}

/// Reports the workers' health now, then keeps it in line with them in the background.
async fn start_health(
    workers: Workers,
) -> (
    tokio::task::JoinHandle<()>,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let mut last = workers.up();
    workers.report(&reporter, last).await;
    let follow = tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEALTH_INTERVAL).await;
            let now = workers.up();
            if now != last {
                if !(now.0 && now.1) {
                    tracing::error!(
                        encoder_up = now.0,
                        backbone_up = now.1,
                        "a worker has stopped"
                    );
                }
                workers.report(&reporter, now).await;
                last = now;
            }
        }
    });
    (follow, service)
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    library: Arc<ExpertLibrary>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = start_health(Workers {
        library: Some(library.clone()),
        inference: options.inference.clone(),
        answerer: options.inference.is_some(),
    })
    .await;
    let consistency = Consistency::local(library.clone(), options.min_seq_wait);
    let library_api = ExpertLibraryServer::new(LibraryService::with_min_seq_wait(
        library.clone(),
        &options.uploads,
        options.min_seq_wait,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router_api = RouterServer::new(RouterService::with_min_seq_wait(
        library.clone(),
        options.route_defaults.clone(),
        options.min_seq_wait,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let answer = options.inference.clone().map(|inference| {
        let router = options.route_client.clone().unwrap_or_else(|| {
            Arc::new(LocalRouter::new(
                library.clone(),
                options.route_defaults.clone(),
            ))
        });
        answer_api(
            inference,
            router,
            options.fallback_expert.clone(),
            consistency.clone(),
        )
    });
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "roe serving");
    let served = builder(options.tls.clone())?
        .layer(RequestMetricsLayer)
        .layer(options.auth.clone())
        .layer(options.concurrency.clone())
        .layer(MessageLimitLayer)
        .add_service(health_service)
        .add_service(reflection())
        .add_service(library_api)
        .add_service(router_api)
        .add_optional_service(
            options
                .inference
                .map(|inference| inference_api(inference, consistency)),
        )
        .add_optional_service(answer)
        .add_optional_service(options.training.map(|jobs| {
            TrainingServer::new(TrainingService::new(jobs))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        }))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    health.abort();
    // Graceful shutdown: keep the index graphs so that the next start reloads them instead of
    // rebuilding (a no-op when they did not change). Sled holds everything, so a failure only
    // costs the next start a rebuild.
    match tokio::task::spawn_blocking(move || library.persist_index()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("could not persist the index at shutdown: {e}"),
        Err(e) => tracing::warn!("persisting the index at shutdown failed: {e}"),
    }
    served
}

/// Accepted connections with Nagle's algorithm off: a response's frames then leave at once
/// instead of waiting up to 40 ms for the client's delayed ACK (tonic applies its own
/// `tcp_nodelay` only to listeners it binds itself).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves inference only (`roe serve --role inference`): `roe.v1.Inference` over `inference`
/// (whose experts come from a library served by another process), `roe.v1.Answerer` when
/// `options.route_client` is set (routing then happens in that other process too), gRPC
/// health and reflection. `options.inference`, `options.route_defaults` and
/// `options.min_seq_wait` are not used (a request's `min_library_seq` is passed on to the
/// library process, which waits for it).
pub async fn serve_inference(
    listener: TcpListener,
    inference: Arc<BackboneInference>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = start_health(Workers {
        library: None,
        inference: Some(inference.clone()),
        answerer: options.route_client.is_some(),
    })
    .await;
    // No library here: a request's min_library_seq goes on to the library process.
    let answer = options.route_client.map(|router| {
        answer_api(
            inference.clone(),
            router,
            options.fallback_expert,
            Consistency::remote(),
        )
    });
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "roe serving inference only");
    let served = builder(options.tls.clone())?
        .layer(RequestMetricsLayer)
        .layer(options.auth.clone())
        .layer(options.concurrency.clone())
        .layer(MessageLimitLayer)
        .add_service(health_service)
        .add_service(reflection())
        .add_service(inference_api(inference, Consistency::remote()))
        .add_optional_service(answer)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    health.abort();
    served
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = super::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
