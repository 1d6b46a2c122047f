//! `roe.v1.Router`: which expert fits a task given by example queries.

use std::sync::Arc;

use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::retrieval::{Query, RouteOptions};
use roe_serving::{LocalRouter, RouteService};
use tonic::{Request, Response, Status};

use crate::convert::{query_from_proto, route_overrides, route_result_to_proto};
use crate::proto::{self, router_server::Router as Api};
use crate::status::serving_status;

pub struct RouterService {
    router: LocalRouter,
}

impl RouterService {
    pub fn new(library: Arc<ExpertLibrary>, defaults: RouteOptions) -> Self {
        Self {
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
        let req = request.into_inner();
        let overrides = route_overrides(req.options, "options")?;
        let queries: Vec<Query> = req.queries.into_iter().map(query_from_proto).collect();
        let result = self
            .router
            .route(queries, overrides)
            .await
            .map_err(serving_status)?;
        Ok(Response::new(route_result_to_proto(result)))
    }
}
