//! `roe.v1.Inference`: the gRPC handler over the serving core's [`Inference`] (Score,
//! ScoreEnsemble, Generate). Messages are converted in [`crate::convert`], errors mapped in
//! [`crate::status`]; batching, caching and checks live in `roe-serving`. A request's
//! `min_library_seq` is honoured as [`crate::consistency`] says: waited for in this process's
//! library, or passed on to the library process that serves the experts.

use std::sync::Arc;

use roe_serving::{
    BackboneInference, EnsembleRequest, GenerateRequest, PromptFormat, ScoreRequest, Started,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::consistency::Consistency;
use crate::convert::{finish_name, generate_options, score_response};
use crate::proto::{self, inference_server::Inference as Api};
use crate::status::serving_status;

pub struct InferenceService {
    inference: Arc<BackboneInference>,
    /// How reads of experts honour `min_library_seq`.
    consistency: Consistency,
}

impl InferenceService {
    /// The service over `inference`, whose experts come from the library `consistency`
    /// describes.
    pub fn new(inference: Arc<BackboneInference>, consistency: Consistency) -> Self {
        Self {
            inference,
            consistency,
        }
    }
}

#[tonic::async_trait]
impl Api for InferenceService {
    async fn score(
        &self,
        request: Request<proto::ScoreRequest>,
    ) -> Result<Response<proto::ScoreResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let choices = req.choices.clone();
        let scoring = self.inference.score(ScoreRequest {
            expert_id: req.expert_id.clone(),
            input: req.input,
            choices: req.choices,
            truncate: req.truncate,
        });
        let out = self
            .consistency
            .read(req.min_library_seq, &metadata, async {
                scoring.await.map_err(serving_status)
            })
            .await?;
        Ok(Response::new(score_response(req.expert_id, &choices, &out)))
    }

    async fn score_ensemble(
        &self,
        request: Request<proto::ScoreEnsembleRequest>,
    ) -> Result<Response<proto::ScoreEnsembleResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let scoring = self.inference.score_ensemble(EnsembleRequest {
            expert_ids: req.expert_ids.clone(),
            input: req.input,
            choices: req.choices.clone(),
            truncate: req.truncate,
        });
        let out = self
            .consistency
            .read(req.min_library_seq, &metadata, async {
                scoring.await.map_err(serving_status)
            })
            .await?;
        Ok(Response::new(proto::ScoreEnsembleResponse {
            members: req
                .expert_ids
                .into_iter()
                .zip(&out.members)
                .map(|(id, member)| score_response(id, &req.choices, member))
                .collect(),
            votes: out.vote.votes,
            summed_logprob: out.vote.summed_logprob,
            best: out.vote.best as u32,
        }))
    }

    type GenerateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::GenerateResponse, Status>> + Send>,
    >;

    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let options = generate_options(&req);
        let min_library_seq = req.min_library_seq;
        // The prompt runs before the answer, so that its errors become the status.
        let starting = self.inference.start_generation(GenerateRequest {
            expert_id: req.expert_id,
            input: req.input,
            format: PromptFormat::Canonical,
            options,
            truncate: req.truncate,
        });
        let Started { tokens, usage } = self
            .consistency
            .read(min_library_seq, &metadata, async {
                starting.await.map_err(serving_status)
            })
            .await?;
        let mut first = Some(usage);
        let stream = UnboundedReceiverStream::new(tokens).map(move |token| {
            let usage = first.take().unwrap_or_default();
            token
                .map(|t| proto::GenerateResponse {
                    text: t.text,
                    token_id: t.id,
                    logprob: t.logprob,
                    finish_reason: t.finish.map(finish_name).unwrap_or_default().to_string(),
                    prompt_tokens: usage.prompt_tokens as u32,
                    truncated_tokens: usage.truncated_tokens as u32,
                })
                .map_err(serving_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
