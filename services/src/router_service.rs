//! `roe.v1.Router`: which expert fits a task given by example queries.

use std::sync::Arc;
use std::time::Duration;

use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::retrieval::{Query, RouteOptions};
use roe_serving::{LocalRouter, RouteService};
use tonic::{Request, Response, Status};

use crate::consistency::{self, Consistency};
use crate::convert::{query_from_proto, route_overrides, route_result_to_proto};
use crate::proto::{self, router_server::Router as Api};
use crate::status::serving_status;

pub struct RouterService {
    router: LocalRouter,
    /// How routes wait for their `min_library_seq`.
    consistency: Consistency,
}

impl RouterService {
    pub fn new(library: Arc<ExpertLibrary>, defaults: RouteOptions) -> Self {
        Self::with_min_seq_wait(library, defaults, consistency::DEFAULT_MIN_SEQ_WAIT)
    }

    /// [`Self::new`] whose routes wait at most `min_seq_wait` for their `min_library_seq`.
    pub fn with_min_seq_wait(
        library: Arc<ExpertLibrary>,
        defaults: RouteOptions,
        min_seq_wait: Duration,
    ) -> Self {
        Self {
            consistency: Consistency::local(library.clone(), min_seq_wait),
            router: LocalRouter::new(library, defaults),
        }
    }
}

#[tonic::async_trait]
impl Api for RouterService {
    async fn route(
        &self,
        request: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteResponse>, Status> {
        let deadline = consistency::deadline(request.metadata());
        let req = request.into_inner();
        let overrides = route_overrides(req.options, "options")?;
        let queries: Vec<Query> = req.queries.into_iter().map(query_from_proto).collect();
        self.consistency.wait(req.min_library_seq, deadline).await?;
        let result = self
            .router
            .route(queries, overrides)
            .await
            .map_err(serving_status)?;
        Ok(Response::new(route_result_to_proto(result)))
    }
}
