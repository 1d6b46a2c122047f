//! `roe.v1.Answerer`: the gRPC handler over the serving core's [`Answerer`] (route a task,
//! then answer its inputs with the winner). A request's `min_library_seq` holds for routing
//! and for the winner's weights (see [`crate::consistency`]).

use std::sync::Arc;

use roe_serving::BackboneAnswerer;
use tonic::{Request, Response, Status};

use crate::consistency::Consistency;
use crate::convert::{answer_request, answered_to_proto};
use crate::proto::{self, answerer_server::Answerer as Api};
use crate::status::serving_status;

pub struct AnswerService {
    answerer: Arc<BackboneAnswerer>,
    /// How routing and reads of experts honour `min_library_seq`.
    consistency: Consistency,
}

impl AnswerService {
    pub fn new(answerer: Arc<BackboneAnswerer>, consistency: Consistency) -> Self {
        Self {
            answerer,
            consistency,
        }
    }
}

#[tonic::async_trait]
impl Api for AnswerService {
    async fn answer(
        &self,
        request: Request<proto::AnswerRequest>,
    ) -> Result<Response<proto::AnswerResponse>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        let min_library_seq = request.min_library_seq;
        let req = answer_request(request)?;
        let answering = self.answerer.answer(req);
        let answered = self
            .consistency
            .read(min_library_seq, &metadata, async {
                answering.await.map_err(serving_status)
            })
            .await?;
        Ok(Response::new(answered_to_proto(answered)))
    }
}
