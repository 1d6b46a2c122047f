//! A bound on requests in flight, as TEI's `max_concurrent_requests`: past it a call is
//! refused at once with RESOURCE_EXHAUSTED instead of queueing without limit. A request counts
//! until its response body ends, so a streaming call (Generate, WatchTraining) holds its place
//! for as long as it streams. Health is never refused: an overloaded server is still alive.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The tower layer; `None` inside: no bound.
#[derive(Debug, Clone, Default)]
pub struct ConcurrencyLimitLayer {
    limit: Option<(usize, Arc<Semaphore>)>,
}

impl ConcurrencyLimitLayer {
    /// At most `max` requests in flight (0: no bound).
    pub fn new(max: usize) -> Self {
        Self {
            limit: (max > 0).then(|| (max, Arc::new(Semaphore::new(max)))),
        }
    }

    /// The bound and its places, shared with the HTTP API so that both servers count
    /// against one limit (None: no bound).
    pub fn permits(&self) -> Option<(usize, Arc<Semaphore>)> {
        self.limit.clone()
    }
}

impl<S> tower_layer::Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            limit: self.limit.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limit: Option<(usize, Arc<Semaphore>)>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for ConcurrencyLimit<S>
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
        let Some((max, semaphore)) = &self.limit else {
            return Box::pin(self.inner.call(req));
        };
        if req.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = semaphore.clone().try_acquire_owned() else {
            tracing::warn!(
                method = req.uri().path(),
                max,
                "refused: too many requests in flight"
            );
            let status = Status::resource_exhausted(format!(
                "server: {max} requests in flight (--max-concurrent-requests); retry later"
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            // The permit goes with the body: released when the last frame is sent or the
            // client goes away.
            Ok(response.map(|body| {
                tonic::body::Body::new(PermitBody {
                    inner: body,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body that holds a place among the requests in flight while it lives.
struct PermitBody {
    inner: tonic::body::Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for PermitBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

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
