//! `roe.v1.Answerer`: route a task and answer its inputs with the winning expert in one call.
//!
//! The client sends example queries of its task (or only the inputs it wants answered, which
//! then serve as the queries). roe routes them, answers every input with the winner — rank
//! classification through the Inference service's Score scheduler (so one call's inputs run
//! in one batch, and concurrent calls for different experts share batches), or generation —
//! and returns the routing evidence. When routing abstains, the server's configured fallback
//! (the bare backbone or a merged expert: `roe serve --fallback-expert`) answers, and the
//! response says so.
//!
//! The service lives beside the Inference service because it needs the backbone; it reaches
//! the router through [`RouteClient`]: [`LocalRouteClient`] in a single process,
//! [`RemoteRouteClient`] when the router runs elsewhere.

use std::sync::Arc;

use roe_expert_library::library::ExpertLibrary;
use roe_expert_library::retrieval::RouteOptions;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::inference_service::{
    check_score_input, check_text_input, finish_name, generate_params, prefixed, score_response,
    InferenceService, ScoreItem,
};
use crate::proto::{self, answerer_server::Answerer as Api, router_client::RouterClient};
use crate::router_service::RouterService;
use crate::server::MAX_MESSAGE_BYTES;

/// Most inputs one Answer call may score (each at most `MAX_CHOICES` choices).
pub const MAX_SCORE_INPUTS: usize = 64;
/// Most inputs one Answer call may generate for: they run one after another, up to
/// `MAX_NEW_TOKENS` each, so the bound is lower than for scoring.
pub const MAX_GENERATE_INPUTS: usize = 16;

/// How the Answerer reaches the router.
#[tonic::async_trait]
pub trait RouteClient: Send + Sync + 'static {
    /// Routes as `roe.v1.Router/Route` does (same validation and statuses).
    async fn route(&self, req: proto::RouteRequest) -> Result<proto::RouteResponse, Status>;

    /// The abstain threshold applied when a request leaves it unset, if this side knows it
    /// (only used to explain a fallback).
    fn default_abstain_threshold(&self) -> Option<f32> {
        None
    }
}

/// Routes in this process over the local library, with the server's route defaults.
pub struct LocalRouteClient {
    router: RouterService,
    abstain_threshold: f32,
}

impl LocalRouteClient {
    pub fn new(library: Arc<ExpertLibrary>, defaults: RouteOptions) -> Self {
        Self {
            abstain_threshold: defaults.abstain_threshold,
            router: RouterService::new(library, defaults),
        }
    }
}

#[tonic::async_trait]
impl RouteClient for LocalRouteClient {
    async fn route(&self, req: proto::RouteRequest) -> Result<proto::RouteResponse, Status> {
        use crate::proto::router_server::Router;
        self.router
            .route(Request::new(req))
            .await
            .map(Response::into_inner)
    }

    fn default_abstain_threshold(&self) -> Option<f32> {
        Some(self.abstain_threshold)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteClientError {
    #[error("router URL {url:?} is invalid: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Routes through a `roe.v1.Router` served elsewhere (a `roe serve` holding the library).
#[derive(Clone)]
pub struct RemoteRouteClient {
    client: RouterClient<Channel>,
}

impl RemoteRouteClient {
    /// A client of the router at `url` (e.g. `http://10.0.0.5:50051`). It connects lazily, so
    /// this process may start before the router; while the router is unreachable, Answer
    /// calls fail with UNAVAILABLE.
    pub fn new(url: &str) -> Result<Self, RouteClientError> {
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|source| {
            RouteClientError::InvalidUrl {
                url: url.to_string(),
                source,
            }
        })?;
        Ok(Self::from_channel(endpoint.connect_lazy()))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self {
            client: RouterClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        }
    }
}

#[tonic::async_trait]
impl RouteClient for RemoteRouteClient {
    async fn route(&self, req: proto::RouteRequest) -> Result<proto::RouteResponse, Status> {
        // Clones share the channel; RouterClient needs `&mut self` per call.
        self.client
            .clone()
            .route(req)
            .await
            .map(Response::into_inner)
    }
}

pub struct AnswerService {
    inference: Arc<InferenceService>,
    router: Arc<dyn RouteClient>,
    /// Answers when routing abstains; empty: the bare backbone.
    fallback_expert: String,
}

impl AnswerService {
    /// `fallback_expert` ("" = bare backbone) should have been checked with
    /// [`InferenceService::check_expert`] at start-up; if it disappears later, abstaining
    /// calls fail with FAILED_PRECONDITION.
    pub fn new(
        inference: Arc<InferenceService>,
        router: Arc<dyn RouteClient>,
        fallback_expert: impl Into<String>,
    ) -> Self {
        Self {
            inference,
            router,
            fallback_expert: fallback_expert.into(),
        }
    }

    pub fn fallback_expert(&self) -> &str {
        &self.fallback_expert
    }

    /// Why routing gave no winner, for `fallback_reason`.
    fn fallback_reason(
        &self,
        req_threshold: Option<f32>,
        routing: &proto::RouteResponse,
    ) -> String {
        let Some(top) = routing.ranked.first() else {
            return "abstain: no eligible expert".to_string();
        };
        match req_threshold.or_else(|| self.router.default_abstain_threshold()) {
            Some(t) => format!(
                "abstain: winner share {:.2} < {t:.2} ({})",
                top.share, top.expert_id
            ),
            None => format!(
                "abstain: winner share {:.2} below the router's threshold ({})",
                top.share, top.expert_id
            ),
        }
    }
}

/// What to answer, after validation.
enum Work {
    Score(Vec<proto::AnswerInput>),
    Generate(Vec<proto::AnswerInput>, roe_backbone::GenerateParams),
}

/// Validates everything but the queries (the router checks those) before any work is done.
fn plan(req: &proto::AnswerRequest) -> Result<(Vec<proto::Query>, Work), Status> {
    if req.queries.is_empty() && req.inputs.is_empty() {
        return Err(Status::invalid_argument(
            "inputs: nothing to answer (queries and inputs are both empty)",
        ));
    }
    // Inputs taken from the queries are reported under the field the client filled.
    let (inputs, field) = if req.inputs.is_empty() {
        let inputs = req
            .queries
            .iter()
            .map(|q| proto::AnswerInput {
                input: q.input.clone(),
                choices: q.choices.clone(),
            })
            .collect::<Vec<_>>();
        (inputs, "queries")
    } else {
        (req.inputs.clone(), "inputs")
    };
    let queries = if req.queries.is_empty() {
        inputs
            .iter()
            .map(|i| proto::Query {
                input: i.input.clone(),
                choices: i.choices.clone(),
                target: None,
            })
            .collect()
    } else {
        req.queries.clone()
    };
    let generate = match proto::AnswerMode::try_from(req.mode) {
        Ok(proto::AnswerMode::Unspecified) => inputs.iter().any(|i| i.choices.is_empty()),
        Ok(proto::AnswerMode::Score) => false,
        Ok(proto::AnswerMode::Generate) => true,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "mode: unknown value {}",
                req.mode
            )))
        }
    };
    let limit = if generate {
        MAX_GENERATE_INPUTS
    } else {
        MAX_SCORE_INPUTS
    };
    if inputs.len() > limit {
        let what = if generate { "generate" } else { "score" };
        let from = if field == "queries" {
            " (the queries, as no inputs were given)"
        } else {
            ""
        };
        return Err(Status::resource_exhausted(format!(
            "inputs: {} to {what}{from}, at most {limit} per call",
            inputs.len()
        )));
    }
    if generate {
        let stop_bytes: usize = req.stop.iter().map(String::len).sum();
        for (i, inp) in inputs.iter().enumerate() {
            check_text_input(&format!("{field}[{i}]."), &inp.input, stop_bytes)?;
        }
        let params = generate_params(&proto::GenerateRequest {
            expert_id: String::new(),
            input: String::new(),
            max_new_tokens: req.max_new_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            // One seed for every input: a seeded call is reproducible as a whole.
            seed: Some(req.seed.unwrap_or_else(rand::random)),
            stop: req.stop.clone(),
        })?;
        Ok((queries, Work::Generate(inputs, params)))
    } else {
        for (i, inp) in inputs.iter().enumerate() {
            check_score_input(&format!("{field}[{i}]."), &inp.input, &inp.choices)?;
        }
        Ok((queries, Work::Score(inputs)))
    }
}

#[tonic::async_trait]
impl Api for AnswerService {
    async fn answer(
        &self,
        request: Request<proto::AnswerRequest>,
    ) -> Result<Response<proto::AnswerResponse>, Status> {
        let req = request.into_inner();
        let (queries, work) = plan(&req)?;
        let req_threshold = req.route.as_ref().and_then(|o| o.abstain_threshold);
        let routing = self
            .router
            .route(proto::RouteRequest {
                queries,
                options: req.route,
            })
            .await?;
        let winner =
            (!routing.abstain && !routing.expert_id.is_empty()).then(|| routing.expert_id.clone());
        let (expert_id, fell_back, fallback_reason) = match winner {
            Some(id) => (id, false, String::new()),
            None => (
                self.fallback_expert.clone(),
                true,
                self.fallback_reason(req_threshold, &routing),
            ),
        };
        let expert = match self.inference.resolve(expert_id.clone()).await {
            Ok(e) => e,
            // The configured fallback was deleted (or replaced by one that no longer fits)
            // after start-up: a server configuration problem, not the caller's.
            Err(s) if fell_back => {
                return Err(Status::failed_precondition(format!(
                    "routing abstained and the fallback expert {expert_id:?} \
                     (roe serve --fallback-expert) cannot be used: {}",
                    s.message()
                )))
            }
            Err(s) => return Err(prefixed(&format!("routed expert {expert_id:?}"), s)),
        };
        let answers = match work {
            Work::Score(inputs) => {
                let items = inputs
                    .iter()
                    .map(|i| ScoreItem {
                        expert: expert.clone(),
                        input: i.input.clone(),
                        choices: i.choices.clone(),
                    })
                    .collect();
                let outs = self.inference.score_items(items).await?;
                inputs
                    .iter()
                    .zip(&outs)
                    .map(|(i, out)| proto::Answer {
                        kind: Some(proto::answer::Kind::Score(score_response(
                            expert_id.clone(),
                            &i.choices,
                            out,
                        ))),
                    })
                    .collect()
            }
            Work::Generate(inputs, params) => {
                let mut answers = Vec::with_capacity(inputs.len());
                for (n, i) in inputs.into_iter().enumerate() {
                    let (text, finish) = self
                        .inference
                        .generate_text(expert.clone(), i.input, params.clone())
                        .await
                        .map_err(|s| prefixed(&format!("inputs[{n}]"), s))?;
                    answers.push(proto::Answer {
                        kind: Some(proto::answer::Kind::Generated(proto::Generated {
                            text,
                            finish_reason: finish_name(finish).to_string(),
                        })),
                    });
                }
                answers
            }
        };
        tracing::info!(
            expert = %expert_id,
            fell_back,
            reason = %fallback_reason,
            answers = answers.len(),
            "answered"
        );
        Ok(Response::new(proto::AnswerResponse {
            routing: Some(routing),
            expert_id,
            fell_back,
            fallback_reason,
            answers,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(text: &str, choices: &[&str]) -> proto::AnswerInput {
        proto::AnswerInput {
            input: text.to_string(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn mode_follows_the_inputs_choices_unless_asked() {
        let mut req = proto::AnswerRequest {
            inputs: vec![input("a", &["x", "y"]), input("b", &["x"])],
            ..Default::default()
        };
        let (queries, work) = plan(&req).unwrap();
        assert!(matches!(work, Work::Score(ref v) if v.len() == 2));
        // No queries: the inputs are the queries.
        assert_eq!(queries.len(), 2);
        assert_eq!(queries[1].input, "b");
        req.inputs.push(input("c", &[]));
        assert!(matches!(plan(&req).unwrap().1, Work::Generate(..)));
        req.mode = proto::AnswerMode::Score as i32;
        let e = plan(&req).err().unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("inputs[2].choices"), "{e:?}");
        req.mode = 7;
        assert!(plan(&req).err().unwrap().message().starts_with("mode"));
    }

    #[test]
    fn queries_are_answered_when_no_inputs_are_given() {
        let req = proto::AnswerRequest {
            queries: vec![
                proto::Query {
                    input: "q0".into(),
                    choices: vec!["a".into()],
                    target: Some("a".into()),
                },
                proto::Query {
                    input: " ".into(),
                    choices: vec!["a".into()],
                    target: None,
                },
            ],
            ..Default::default()
        };
        let e = plan(&req).err().unwrap();
        assert!(e.message().starts_with("queries[1].input"), "{e:?}");
        let mut ok = req.clone();
        ok.queries.pop();
        let (queries, work) = plan(&ok).unwrap();
        // Labeled queries keep their targets for routing.
        assert_eq!(queries[0].target.as_deref(), Some("a"));
        assert!(matches!(work, Work::Score(ref v) if v[0].input == "q0"));
    }

    #[test]
    fn limits_name_the_inputs() {
        let req = proto::AnswerRequest {
            inputs: (0..=MAX_SCORE_INPUTS).map(|_| input("x", &["a"])).collect(),
            ..Default::default()
        };
        let e = plan(&req).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().starts_with("inputs:"), "{e:?}");
        let req = proto::AnswerRequest {
            inputs: (0..=MAX_GENERATE_INPUTS).map(|_| input("x", &[])).collect(),
            ..Default::default()
        };
        assert_eq!(
            plan(&req).err().unwrap().code(),
            tonic::Code::ResourceExhausted
        );
        let e = plan(&proto::AnswerRequest::default()).err().unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("inputs:"), "{e:?}");
        let req = proto::AnswerRequest {
            inputs: vec![input("x", &[])],
            temperature: 9.0,
            ..Default::default()
        };
        assert!(plan(&req)
            .err()
            .unwrap()
            .message()
            .starts_with("temperature"));
    }
}
