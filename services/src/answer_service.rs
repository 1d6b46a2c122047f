//! `roe.v1.Answerer`: the gRPC handler over the serving core's [`Answerer`] (route a task,
//! then answer its inputs with the winner).

use std::sync::Arc;

use roe_serving::BackboneAnswerer;
use tonic::{Request, Response, Status};

use crate::convert::{answer_request, answered_to_proto};
use crate::proto::{self, answerer_server::Answerer as Api};
use crate::status::serving_status;

pub struct AnswerService {
    answerer: Arc<BackboneAnswerer>,
}

impl AnswerService {
    pub fn new(answerer: Arc<BackboneAnswerer>) -> Self {
        Self { answerer }
    }
}

#[tonic::async_trait]
impl Api for AnswerService {
    async fn answer(
        &self,
        request: Request<proto::AnswerRequest>,
    ) -> Result<Response<proto::AnswerResponse>, Status> {
        let req = answer_request(request.into_inner())?;
        let answered = self.answerer.answer(req).await.map_err(serving_status)?;
        Ok(Response::new(answered_to_proto(answered)))
    }
}
