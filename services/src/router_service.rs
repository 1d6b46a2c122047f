//! `roe.v1.Router`: which expert fits a task given by example queries.

use std::sync::Arc;

use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::retrieval::{Query, RouteOptions};
use tonic::{Request, Response, Status};

use crate::convert::{query_from_proto, route_options, route_result_to_proto, status};
use crate::library_service::blocking;
use crate::proto::{self, router_server::Router as Api};

pub struct RouterService {
    library: Arc<ExpertLibrary>,
    defaults: RouteOptions,
}

impl RouterService {
    pub fn new(library: Arc<ExpertLibrary>, defaults: RouteOptions) -> Self {
        Self { library, defaults }
    }
}

#[tonic::async_trait]
impl Api for RouterService {
    async fn route(
        &self,
        request: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteResponse>, Status> {
        let req = request.into_inner();
        let options = route_options(req.options, &self.defaults)?;
        let queries: Vec<Query> = req.queries.into_iter().map(query_from_proto).collect();
        let library = self.library.clone();
        let result = blocking(move || library.route(&queries, &options).map_err(status)).await?;
        Ok(Response::new(route_result_to_proto(result)))
    }
}
