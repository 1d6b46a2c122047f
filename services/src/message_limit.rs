//! A request message over the server's size limit is RESOURCE_EXHAUSTED, as the gRPC spec
//! says and the proto documents. tonic reports it as OUT_OF_RANGE ("decoded message length
//! too large"); this layer rewrites that one status on its way out, naming the field and the
//! way around it. The status of such a refusal travels in the response headers
//! (trailers-only), as tonic refuses the request before a handler produces a body.

use std::pin::Pin;
use std::task::{Context, Poll};

const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: ";

#[derive(Debug, Clone, Copy, Default)]
pub struct MessageLimitLayer;

impl<S> tower_layer::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit { inner }
    }
}

#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for MessageLimit<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
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
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_oversize(response.headers_mut());
            Ok(response)
        })
    }
}

/// OUT_OF_RANGE "decoded message length too large" → RESOURCE_EXHAUSTED naming `message`.
fn rewrite_oversize(headers: &mut http::HeaderMap) {
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    if status.code() != tonic::Code::OutOfRange {
        return;
    }
    let Some(sizes) = status.message().strip_prefix(TONIC_TOO_LARGE) else {
        return;
    };
    let rewritten = tonic::Status::resource_exhausted(format!(
        "message: {sizes}; send adapters and instances in parts with RegisterExpertStream, \
         training rows with StartTrainingStream"
    ));
    if rewritten.add_header(headers).is_err() {
        tracing::warn!("could not rewrite an oversize status");
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite_oversize;

    fn headers_of(status: tonic::Status) -> http::HeaderMap {
        status.into_http::<()>().headers().clone()
    }

    #[test]
    fn only_tonics_oversize_status_is_rewritten() {
        // As tonic writes it: percent-encoded.
        let mut h = headers_of(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 73400325 bytes, the limit is: \
             67108864 bytes",
        ));
        rewrite_oversize(&mut h);
        let s = tonic::Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(
            s.message()
                .starts_with("message: found 73400325 bytes, the limit is: 67108864 bytes"),
            "{s:?}"
        );
        // Another OUT_OF_RANGE stays as it is.
        let mut other = headers_of(tonic::Status::out_of_range("page_token: past the end"));
        rewrite_oversize(&mut other);
        let s = tonic::Status::from_header_map(&other).unwrap();
        assert_eq!(s.code(), tonic::Code::OutOfRange);
        assert_eq!(s.message(), "page_token: past the end");
    }
}
