//! gRPC clients of another roe process, for `roe serve --role inference`: the expert library
//! ([`RemoteExpertSource`]) and the router ([`RemoteRouter`]) of a `roe serve --role router`.
//! Every call has a deadline: an unreachable peer is UNAVAILABLE (after at most the connect
//! timeout), a peer that does not answer in time is DEADLINE_EXCEEDED, and the deadline travels
//! to the peer (grpc-timeout) so that it stops working for a caller that has given up. The
//! `min_library_seq` of the request a call serves travels with it
//! ([`crate::consistency::forwarded`]): the peer waits for the seq.

use std::time::Duration;

use roe_expert_library::{PeftAdapter, Query, RouteResult};
use roe_serving::{ErrorKind, ExpertRef, ExpertSource, RouteOverrides, RouteService, ServingError};
use tonic::transport::{Channel, Endpoint};

use crate::auth::{ClientKey, KeyedChannel};
use crate::convert::{
    expert_ref_from_proto, query_to_proto, route_overrides_to_proto, route_result_from_proto,
};
use crate::proto::{self, expert_library_client::ExpertLibraryClient, router_client::RouterClient};
use crate::server::MAX_MESSAGE_BYTES;
use crate::status::remote_error;
use crate::tls::ClientTls;

/// How long remote calls may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteTimeouts {
    /// To open a connection.
    pub connect: Duration,
    /// For one call, connection included.
    pub request: Duration,
}

impl Default for RemoteTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidUrl {
    #[error("peer URL {url:?} is invalid: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("peer URL {url:?}: {source}")]
    Tls {
        url: String,
        #[source]
        source: crate::tls::TlsError,
    },
}

/// A lazily connected channel to `url` (TLS when it is https), so this process may start
/// before its peer.
fn channel(url: &str, timeouts: RemoteTimeouts, tls: &ClientTls) -> Result<Channel, InvalidUrl> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|source| InvalidUrl::Url {
        url: url.to_string(),
        source,
    })?;
    let endpoint = tls.apply(endpoint).map_err(|source| InvalidUrl::Tls {
        url: url.to_string(),
        source,
    })?;
    Ok(endpoint
        .connect_timeout(timeouts.connect)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .connect_lazy())
}

/// Runs one remote call under `deadline`, telling the peer the deadline too.
async fn call<T, Reply>(
    what: &str,
    deadline: Duration,
    message: T,
    f: impl AsyncFnOnce(tonic::Request<T>) -> Result<tonic::Response<Reply>, tonic::Status>,
) -> Result<Reply, ServingError> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    let started = std::time::Instant::now();
    let late = || {
        ServingError::new(
            ErrorKind::DeadlineExceeded,
            format!("{what} did not answer within {deadline:?}"),
        )
    };
    match tokio::time::timeout(deadline, f(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        // The peer enforces the deadline it was sent too, and tonic's server answers an
        // expired one with CANCELLED ("Timeout expired"): still our deadline passing.
        Ok(Err(status))
            if status.code() == tonic::Code::Cancelled && started.elapsed() >= deadline =>
        {
            Err(late())
        }
        Ok(Err(status)) => Err(remote_error(what, status)),
        Err(_) => Err(late()),
    }
}

/// The `roe.v1.ExpertLibrary` of another process.
#[derive(Clone)]
pub struct RemoteExpertSource {
    client: ExpertLibraryClient<KeyedChannel>,
    timeouts: RemoteTimeouts,
}

impl RemoteExpertSource {
    /// A client of the library at `url` (e.g. `http://roe-router:50051`), sending `key`.
    /// While it is unreachable, requests naming an expert fail (the bare backbone keeps
    /// working).
    pub fn new(
        url: &str,
        timeouts: RemoteTimeouts,
        key: ClientKey,
        tls: &ClientTls,
    ) -> Result<Self, InvalidUrl> {
        Ok(Self::from_channel(
            channel(url, timeouts, tls)?,
            timeouts,
            key,
        ))
    }

    pub fn from_channel(channel: Channel, timeouts: RemoteTimeouts, key: ClientKey) -> Self {
        Self {
            // Adapters travel in one GetExpert response, as large as the server sends.
            client: ExpertLibraryClient::with_interceptor(channel, key)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            timeouts,
        }
    }

    async fn get(
        &self,
        id: &str,
        include_adapter: bool,
    ) -> Result<proto::GetExpertResponse, ServingError> {
        let message = proto::GetExpertRequest {
            id: id.to_string(),
            include_instances: false,
            include_adapter,
            // The request this read serves waits for its seq in the library process.
            min_library_seq: crate::consistency::forwarded(),
        };
        // Clones share the channel; the generated client needs `&mut self` per call.
        let mut client = self.client.clone();
        call(
            "the expert library",
            self.timeouts.request,
            message,
            async move |r| client.get_expert(r).await,
        )
        .await
    }
}

#[async_trait::async_trait]
impl ExpertSource for RemoteExpertSource {
    async fn meta(&self, id: &str) -> Result<ExpertRef, ServingError> {
        expert_ref_from_proto(id, self.get(id, false).await?.expert)
    }

    async fn adapter(&self, id: &str) -> Result<(ExpertRef, PeftAdapter), ServingError> {
        let r = self.get(id, true).await?;
        let meta = expert_ref_from_proto(id, r.expert)?;
        let a = r.adapter.ok_or_else(|| {
            ServingError::internal(format!("the expert library sent no adapter for {id:?}"))
        })?;
        Ok((
            meta,
            PeftAdapter {
                config_json: a.adapter_config_json,
                safetensors: a.adapter_model_safetensors,
            },
        ))
    }
}

/// The `roe.v1.Router` of another process.
#[derive(Clone)]
pub struct RemoteRouter {
    client: RouterClient<KeyedChannel>,
    timeouts: RemoteTimeouts,
}

impl RemoteRouter {
    /// A client of the router at `url`, sending `key`; while it is unreachable, Answer calls
    /// fail.
    pub fn new(
        url: &str,
        timeouts: RemoteTimeouts,
        key: ClientKey,
        tls: &ClientTls,
    ) -> Result<Self, InvalidUrl> {
        Ok(Self::from_channel(
            channel(url, timeouts, tls)?,
            timeouts,
            key,
        ))
    }

    pub fn from_channel(channel: Channel, timeouts: RemoteTimeouts, key: ClientKey) -> Self {
        Self {
            client: RouterClient::with_interceptor(channel, key)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            timeouts,
        }
    }
}

#[async_trait::async_trait]
impl RouteService for RemoteRouter {
    async fn route(
        &self,
        queries: Vec<Query>,
        options: RouteOverrides,
    ) -> Result<RouteResult, ServingError> {
        let message = proto::RouteRequest {
            queries: queries.into_iter().map(query_to_proto).collect(),
            options: Some(route_overrides_to_proto(&options)),
            min_library_seq: crate::consistency::forwarded(),
        };
        let mut client = self.client.clone();
        let reply = call(
            "the router",
            self.timeouts.request,
            message,
            async move |r| client.route(r).await,
        )
        .await?;
        Ok(route_result_from_proto(reply))
    }
}
