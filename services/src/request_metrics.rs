//! Per-method request counts by status and latency for the gRPC server: a tower layer that
//! reads each call's `grpc-status` (from the trailers, or from the headers of an error
//! returned at once) and records it when the response body ends, so that a streaming call
//! counts its whole length. A call whose client went away before the end counts as
//! CANCELLED. The same moment writes the call's audit line ([`crate::auth::audit_end`]),
//! for the calls the key check let through.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use roe_serving::metrics::{request_done, Transport};

use crate::auth::{audit_end, Caller};

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestMetricsLayer;

impl<S> tower_layer::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> RequestMetrics<S> {
        RequestMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The method label of `path`: roe's, health's and reflection's methods by name, anything
/// else as "other" (a client must not be able to mint label values; a method of these
/// services that does not exist is UNIMPLEMENTED, and counted as "other" too).
fn endpoint(path: &str) -> String {
    let known = ["/roe.v1.", "/grpc.health.v1.Health/", "/grpc.reflection."];
    if known.iter().any(|p| path.starts_with(p)) && path.len() <= 96 {
        path.to_string()
    } else {
        "other".to_string()
    }
}

/// The canonical name of a gRPC status code.
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(code_name)
}

impl<S, B> tower_service::Service<http::Request<B>> for RequestMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let endpoint = endpoint(req.uri().path());
        let started = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            // An error returned at once travels in the headers (a trailers-only response).
            let status = grpc_status(response.headers());
            let caller = response.extensions().get::<Caller>().cloned();
            Ok(response.map(|body| {
                tonic::body::Body::new(MeteredBody {
                    inner: body,
                    endpoint,
                    started,
                    status,
                    caller,
                })
            }))
        })
    }
}

/// A response body that records its call when it is dropped: after its trailers, or when
/// the client went away.
struct MeteredBody {
    inner: tonic::body::Body,
    endpoint: String,
    started: Instant,
    status: Option<&'static str>,
    caller: Option<Caller>,
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let status = self.status.unwrap_or("CANCELLED");
        // A method that does not exist must not become a label value of its own.
        let endpoint = match status {
            "UNIMPLEMENTED" => "other",
            _ => &self.endpoint,
        };
        request_done(Transport::Grpc, endpoint, status, self.started.elapsed());
        if let Some(caller) = &self.caller {
            audit_end(caller, endpoint, status);
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                self.status = Some(status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            endpoint("/roe.v1.Inference/Generate"),
            "/roe.v1.Inference/Generate"
        );
        assert_eq!(endpoint("/evil/x"), "other");
        assert_eq!(endpoint(&format!("/roe.v1.{}", "x".repeat(200))), "other");
        assert_eq!(code_name("3"), "INVALID_ARGUMENT");
        assert_eq!(code_name("junk"), "UNKNOWN");
    }
}
