//! roe's HTTP API, beside gRPC in `roe serve` (as text-embeddings-inference's `router/`
//! serves both): the OpenAI API's models, completions and chat completions, where `model`
//! is an expert id, `base` or `auto` (routed); roe's own JSON endpoints mirroring the gRPC
//! messages; `/openapi.json`; Prometheus `/metrics`; `/health`.
//!
//! The handlers call the serving core and the library, never the gRPC handlers; requests
//! meet the same checks (the core validates), the same API keys and the same bound on
//! requests in flight as gRPC. One module maps errors to responses ([`error`]). With the
//! server's `--tls-cert` it is served over TLS ([`tls`]).
//!
//! Read-your-writes across replicas: a request with the header `roe-min-library-seq: N` (a
//! `library_seq` a gRPC write returned, on any replica) is served once this replica has
//! applied seq N, after a wait of at most `--min-seq-wait-ms` (503 past it); roe's own
//! endpoints also take `minLibrarySeq` in their body, as the gRPC messages do.

pub mod completions;
pub mod error;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod openapi;
pub mod roe_api;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use roe_expert_library::ExpertLibrary;
use roe_services::auth::{presented, ApiKeys};
use roe_services::tls::HttpsConfig;
use roe_serving::{BackboneAnswerer, BackboneInference, LocalRouter, RequestLimits};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{ApiError, ApiResult};

/// Largest request body: the gRPC server's message limit.
pub const MAX_BODY_BYTES: usize = roe_services::server::MAX_MESSAGE_BYTES;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub library: Arc<ExpertLibrary>,
    pub router: Arc<LocalRouter>,
    /// None: no backbone loaded (completions and scoring answer 503).
    pub inference: Option<Arc<BackboneInference>>,
    pub answerer: Option<Arc<BackboneAnswerer>>,
    /// The backbone's name (the `parent` of every model).
    pub backbone: String,
    pub keys: Arc<ApiKeys>,
    /// The bound on requests in flight, shared with the gRPC server.
    pub limit: Option<(usize, Arc<Semaphore>)>,
    pub metrics: Option<PrometheusHandle>,
    pub started_unix: u64,
    /// How long a read waits for this replica to apply its `roe-min-library-seq` before 503
    /// (`--min-seq-wait-ms`; default 2 s).
    pub min_seq_wait: Duration,
}

impl HttpState {
    pub fn new(
        library: Arc<ExpertLibrary>,
        router: Arc<LocalRouter>,
        inference: Option<Arc<BackboneInference>>,
        answerer: Option<Arc<BackboneAnswerer>>,
    ) -> Self {
        let backbone = library
            .backbone(None)
            .map(|b| b.name.clone())
            .unwrap_or_default();
        Self {
            library,
            router,
            inference,
            answerer,
            backbone,
            keys: Arc::new(ApiKeys::default()),
            limit: None,
            metrics: None,
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            min_seq_wait: roe_services::consistency::DEFAULT_MIN_SEQ_WAIT,
        }
    }

    /// Waits until this replica's library has applied seq `min` (0: no wait), at most
    /// [`Self::min_seq_wait`]; 503 naming both seqs after that.
    pub async fn wait_for_seq(&self, min: u64) -> ApiResult<()> {
        roe_services::consistency::wait_for_seq(&self.library, min, self.min_seq_wait)
            .await
            .map_err(ApiError::from)
    }

    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "this server runs no backbone (roe serve --no-inference)",
        )
    }

    pub fn inference(&self) -> ApiResult<&Arc<BackboneInference>> {
        self.inference.as_ref().ok_or_else(Self::unavailable)
    }

    pub fn answerer(&self) -> ApiResult<&Arc<BackboneAnswerer>> {
        self.answerer.as_ref().ok_or_else(Self::unavailable)
    }

    pub fn limits(&self) -> RequestLimits {
        self.inference
            .as_ref()
            .map(|i| i.config().limits.clone())
            .unwrap_or_default()
    }
}

/// A JSON body whose rejections are OpenAI error bodies naming what is wrong.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::JsonDataError(e) => {
            // "Failed to deserialize the JSON body into the target type: <path>: <why>"
            let text = e.body_text();
            let detail = text.split_once("type: ").map_or(text.as_str(), |(_, d)| d);
            let (param, why) = detail.split_once(": ").unwrap_or(("body", detail));
            ApiError::invalid(param, why)
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::invalid("body", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::invalid(
            "content-type",
            "send the body as JSON (content-type: application/json)",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("body: more than {MAX_BODY_BYTES} bytes"),
        )
        .with_code("limit_exceeded"),
        other => ApiError::new(other.status(), "invalid_request_error", other.body_text()),
    }
}

/// A request body (already parsed as JSON) as `T`: a value of the wrong type is a 400 naming
/// the field it is at (`max_tokens`, `messages[0].content`), a missing field by its name.
pub(crate) fn from_body<T: serde::de::DeserializeOwned>(body: serde_json::Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(body).map_err(|e| shape_error(&e))
}

/// Longest field path quoted as `param` (map keys in it are the client's).
const MAX_PARAM_BYTES: usize = 128;

/// A request whose JSON has the wrong shape for its type: the field and why.
fn shape_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let text = e.inner().to_string();
    let path = e.path().to_string();
    // serde reports a missing field at the object that lacks it, naming it in backticks.
    let missing = text
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name)
        .filter(|name| !name.is_empty());
    let mut field = match (path.as_str(), missing) {
        (".", Some(name)) => name.to_string(),
        (".", None) => "body".to_string(),
        (at, Some(name)) => format!("{at}.{name}"),
        (at, None) => at.to_string(),
    };
    if field.len() > MAX_PARAM_BYTES {
        let mut end = MAX_PARAM_BYTES;
        while !field.is_char_boundary(end) {
            end -= 1;
        }
        field.truncate(end);
    }
    ApiError::invalid(&field, text)
}

/// The endpoints anyone may call, keys or not (the API description says so too).
pub(crate) const PUBLIC_PATHS: &[&str] = &["/health", "/metrics", "/openapi.json"];

/// The API keys, as the gRPC server checks them: every endpoint but the [`PUBLIC_PATHS`]
/// reads, and needs a key when the server has any (all HTTP endpoints are reads: writes go
/// over gRPC).
async fn authorize(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let public = PUBLIC_PATHS.contains(&path);
    if state.keys.is_empty() || public {
        return next.run(req).await;
    }
    let refusal = match presented(req.headers()) {
        None => Some("no API key; send `Authorization: Bearer <key>`"),
        Some(key) if state.keys.find(key).is_none() => Some("the API key is not valid"),
        Some(_) => None,
    };
    if let Some(why) = refusal {
        tracing::warn!(target: "audit", path, "refused over HTTP: {why}");
        let mut e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            format!("authorization: {why}"),
        )
        .with_code("invalid_api_key");
        e.param = None;
        return e.into_response();
    }
    next.run(req).await
}

/// A body announced past the limit is refused before any of it is read (the JSON extractor
/// would read up to the limit first).
async fn refuse_oversized(req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("body: more than {MAX_BODY_BYTES} bytes"),
        )
        .with_code("limit_exceeded")
        .into_response();
    }
    next.run(req).await
}

/// The bound on requests in flight, shared with gRPC: past it a request gets 429 at once;
/// a stream holds its place until it ends. Health is never refused.
async fn limit(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let Some((max, semaphore)) = &state.limit else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let Ok(permit) = semaphore.clone().try_acquire_owned() else {
        tracing::warn!(
            path = req.uri().path(),
            max,
            "refused: too many requests in flight"
        );
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("server: {max} requests in flight (--max-concurrent-requests); retry later"),
        )
        .with_code("too_many_requests")
        .into_response();
    };
    let response = next.run(req).await;
    response.map(|body| {
        axum::body::Body::new(PermitBody {
            body,
            _permit: permit,
        })
    })
}

/// A body that holds a place among the requests in flight while it lives.
struct PermitBody {
    body: axum::body::Body,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl http_body::Body for PermitBody {
    type Data = <axum::body::Body as http_body::Body>::Data;
    type Error = <axum::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The request header naming the library seq a read must see.
pub const MIN_LIBRARY_SEQ_HEADER: &str = "roe-min-library-seq";

/// The seq a request's `roe-min-library-seq` header names (0 without one); 400 naming the
/// header when it is not a whole number.
pub fn min_library_seq(headers: &axum::http::HeaderMap) -> ApiResult<u64> {
    let Some(value) = headers.get(MIN_LIBRARY_SEQ_HEADER) else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::invalid(
                MIN_LIBRARY_SEQ_HEADER,
                "not a library seq; send the library_seq a write returned, a whole number \
                 (0: no wait)",
            )
        })
}

/// Serves a request with `roe-min-library-seq` once this replica has applied that seq (at
/// most `--min-seq-wait-ms`, else 503 naming both seqs). The public endpoints ignore it.
async fn wait_for_min_seq(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    if PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let waited = match min_library_seq(req.headers()) {
        Ok(min) => state.wait_for_seq(min).await,
        Err(e) => Err(e),
    };
    match waited {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /health`: 200 while the encoder and the backbone's queues run, else 503; the JSON
/// body says which, and where this replica stands against the library's store. A store that
/// cannot be reached keeps it 200 (the replica answers from what it holds; status
/// `degraded`, the error in `library.last_error`).
async fn health(State(state): State<HttpState>) -> Response {
    let encoder = state.library.encoder().is_healthy();
    let backbone = state.inference.as_ref().map(|i| i.is_healthy());
    let r = state.library.replication();
    let up = encoder && backbone.unwrap_or(true);
    let status = match (up, &r.last_error) {
        (false, _) => "unavailable",
        (true, Some(_)) => "degraded",
        (true, None) => "ok",
    };
    let body = serde_json::json!({
        "status": status,
        "encoder": encoder,
        // null: no backbone loaded (roe serve --no-inference).
        "backbone": backbone,
        "library": {
            "store": r.store,
            "shared": r.shared,
            "applied_seq": r.applied_seq,
            "head_seq": r.head_seq,
            "lag": r.lag(),
            "seconds_since_caught_up": r.since_caught_up.map(|d| d.as_secs_f64()),
            "last_error": r.last_error,
        },
    });
    let code = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn not_found(req: Request) -> ApiError {
    let path: String = req.uri().path().chars().take(128).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no such endpoint: {} {path:?} (see /openapi.json)",
            req.method()
        ),
    )
    .with_code("unknown_url")
}

/// The HTTP API's routes over `state`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/models", get(models::list))
        // Ids may hold `/` (`org/task`): the rest of the path is the id, so clients need
        // not escape it (`%2F` is decoded too).
        .route("/v1/models/{*id}", get(models::get))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/roe/route", post(roe_api::route))
        .route("/v1/roe/score", post(roe_api::score))
        .route("/v1/roe/score-ensemble", post(roe_api::score_ensemble))
        .route("/v1/roe/answer", post(roe_api::answer))
        .route("/v1/roe/experts", get(roe_api::list_experts))
        .route("/v1/roe/experts/{*id}", get(roe_api::get_expert))
        .route("/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics::render))
        .route("/health", get(health))
        .fallback(not_found)
        // Innermost: only requests with a key and a place among those in flight wait.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            wait_for_min_seq,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the HTTP API on an already bound listener until `shutdown` resolves: over TLS
/// (HTTPS) with `tls`, else in plaintext.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    tls: Option<HttpsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_app(listener, router(state), tls, shutdown).await
}

/// [`serve`] for any router (the TLS tests serve a small one).
pub async fn serve_app(
    listener: TcpListener,
    app: Router,
    tls: Option<HttpsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr().ok();
    match tls {
        Some(config) => {
            tracing::info!(?addr, "roe HTTP API serving over TLS (https)");
            let listener = crate::tls::TlsListener::new(listener, config)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            tracing::info!(?addr, "roe HTTP API serving");
            use axum::serve::ListenerExt;
            // Nagle off, as for gRPC: a small response is not held back for the client's
            // delayed ACK.
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("could not set TCP_NODELAY: {e}");
                }
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param_of<T: serde::de::DeserializeOwned>(body: serde_json::Value) -> Option<String> {
        match from_body::<T>(body) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.param,
        }
    }

    #[test]
    fn type_errors_name_the_field_they_are_at() {
        use crate::openai::{ChatRequest, CompletionRequest};
        let completion = |extra: serde_json::Value| {
            let mut body = json!({"model": "base", "prompt": "x"});
            for (k, v) in extra.as_object().into_iter().flatten() {
                body[k.as_str()] = v.clone();
            }
            param_of::<CompletionRequest>(body)
        };
        assert_eq!(
            completion(json!({"max_tokens": -1})).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(completion(json!({"prompt": 42})).as_deref(), Some("prompt"));
        assert_eq!(
            completion(json!({"stream_options": {"include_usage": true, "nope": 1}})).as_deref(),
            Some("stream_options.nope")
        );
        assert_eq!(
            param_of::<CompletionRequest>(json!({"prompt": "x"})).as_deref(),
            Some("model")
        );
        assert_eq!(
            param_of::<ChatRequest>(json!({"model": "base", "messages": [{"role": "user"}]}))
                .as_deref(),
            Some("messages[0].content")
        );
        // A client's key in the path is quoted cut.
        let mut options = serde_json::Map::new();
        options.insert("k".repeat(10_000), json!(1));
        let param = completion(json!({ "stream_options": options })).unwrap_or_default();
        assert!(
            param.starts_with("stream_options.k") && param.len() <= MAX_PARAM_BYTES,
            "{} bytes",
            param.len()
        );
    }
}
