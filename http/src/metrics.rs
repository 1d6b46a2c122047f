//! Prometheus metrics: the exporter that renders what the serving core, the library, the
//! encoder and both servers record (`GET /metrics`), and the HTTP server's per-route request
//! counts and latency.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{describe_gauge, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use roe_serving::metrics::{request_done, Transport};

use crate::HttpState;

/// Latency buckets (seconds): from a cached route to a long generation.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Batch-size buckets.
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The process's Prometheus recorder, installed at the first call (the `metrics` facade
/// has one global recorder; every server of the process renders the same one). None when
/// another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
                })
                .map(|b| b.install_recorder());
            match built {
                Ok(Ok(handle)) => {
                    roe_serving::metrics::describe();
                    roe_expert_library::metrics::describe();
                    roe_encoder::metrics::describe();
                    describe_replication();
                    Some(handle)
                }
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!("metrics are not exported: {e}");
                    None
                }
            }
        })
        .clone()
}

/// `GET /metrics`: the Prometheus text format.
pub async fn render(State(state): State<HttpState>) -> Response {
    let Some(handle) = &state.metrics else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            "metrics are not exported by this process\n",
        )
            .into_response();
    };
    roe_expert_library::metrics::record_sizes(&state.library);
    record_replication(&state.library);
    roe_serving::metrics::record_process();
    handle.run_upkeep();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle.render(),
    )
        .into_response()
}

pub const LIBRARY_APPLIED_SEQ: &str = "roe_library_applied_seq";
pub const LIBRARY_HEAD_SEQ: &str = "roe_library_head_seq";
pub const LIBRARY_LAG: &str = "roe_library_lag";
pub const LIBRARY_SECONDS_SINCE_CAUGHT_UP: &str = "roe_library_seconds_since_caught_up";

fn describe_replication() {
    describe_gauge!(
        LIBRARY_APPLIED_SEQ,
        "The library change log's seq this replica has applied (every write up to it is \
         served here)"
    );
    describe_gauge!(
        LIBRARY_HEAD_SEQ,
        "The shared store's head seq when this replica last read its log"
    );
    describe_gauge!(
        LIBRARY_LAG,
        "Library changes this replica knows of and has not applied (head - applied)"
    );
    describe_gauge!(
        LIBRARY_SECONDS_SINCE_CAUGHT_UP,
        "Seconds since this replica last read the shared store's log (0 for a store no other \
         replica writes; +Inf before the first read)"
    );
}

/// Sets the replication gauges from `library` (at scrape time, as the size gauges).
pub fn record_replication(library: &roe_expert_library::ExpertLibrary) {
    let r = library.replication();
    gauge!(LIBRARY_APPLIED_SEQ).set(r.applied_seq as f64);
    gauge!(LIBRARY_HEAD_SEQ).set(r.head_seq as f64);
    gauge!(LIBRARY_LAG).set(r.lag() as f64);
    let since = match (r.shared, r.since_caught_up) {
        (false, _) => 0.0,
        (true, Some(d)) => d.as_secs_f64(),
        (true, None) => f64::INFINITY,
    };
    gauge!(LIBRARY_SECONDS_SINCE_CAUGHT_UP).set(since);
}

/// Counts each request by its route (the matched pattern, never the client's path) and
/// status, with its latency to the end of the response body (a stream's last event).
pub async fn track(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| format!("{} {}", req.method(), p.as_str()))
        .unwrap_or_else(|| "other".to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    response.map(|body| {
        Body::new(MeteredBody {
            inner: body,
            endpoint,
            status,
            started,
        })
    })
}

struct MeteredBody {
    inner: Body,
    endpoint: String,
    status: String,
    started: Instant,
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        request_done(
            Transport::Http,
            &self.endpoint,
            &self.status,
            self.started.elapsed(),
        );
    }
}

impl http_body::Body for MeteredBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
