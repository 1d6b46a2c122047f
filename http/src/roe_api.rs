//! roe's own JSON endpoints, for what OpenAI has no shape for: each takes and returns the
//! gRPC method's messages in the proto3 JSON mapping (lowerCamelCase field names out, either
//! spelling in; enums by name), converted with the gRPC layer's own conversions and served
//! by the same core calls.
//!
//! | endpoint | gRPC method |
//! |---|---|
//! | `POST /v1/roe/route` | `roe.v1.Router/Route` |
//! | `POST /v1/roe/score` | `roe.v1.Inference/Score` |
//! | `POST /v1/roe/score-ensemble` | `roe.v1.Inference/ScoreEnsemble` |
//! | `POST /v1/roe/answer` | `roe.v1.Answerer/Answer` |
//! | `GET /v1/roe/experts` | `roe.v1.ExpertLibrary/ListExperts` (query: `page_size`, `page_token`) |
//! | `GET /v1/roe/experts/{id}` | `roe.v1.ExpertLibrary/GetExpert` (query: `include_instances`) |
//!
//! A body's `minLibrarySeq` waits as the `roe-min-library-seq` header does (see
//! [`crate::HttpState::wait_for_seq`]); the GET endpoints take the header.

use axum::extract::{Path, Query, State};
use axum::Json;
use roe_expert_library::Query as RouteQuery;
use roe_services::convert::{
    answer_request, answered_to_proto, expert_to_proto, instance_to_proto, query_from_proto,
    route_overrides, route_result_to_proto, score_response,
};
use roe_services::proto;
use roe_serving::{EnsembleRequest, RouteService, ScoreRequest};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::{ApiJson, HttpState};

fn internal(e: impl std::fmt::Display) -> ApiError {
    roe_serving::ServingError::internal(format!("a worker failed: {e}")).into()
}

pub async fn route(
    State(state): State<HttpState>,
    ApiJson(req): ApiJson<proto::RouteRequest>,
) -> ApiResult<Json<proto::RouteResponse>> {
    let overrides = route_overrides(req.options, "options")?;
    let queries: Vec<RouteQuery> = req.queries.into_iter().map(query_from_proto).collect();
    state.wait_for_seq(req.min_library_seq).await?;
    let result = state.router.route(queries, overrides).await?;
    Ok(Json(route_result_to_proto(result)))
}

pub async fn score(
    State(state): State<HttpState>,
    ApiJson(req): ApiJson<proto::ScoreRequest>,
) -> ApiResult<Json<proto::ScoreResponse>> {
    let choices = req.choices.clone();
    state.wait_for_seq(req.min_library_seq).await?;
    let out = state
        .inference()?
        .score(ScoreRequest {
            expert_id: req.expert_id.clone(),
            input: req.input,
            choices: req.choices,
            truncate: req.truncate,
        })
        .await?;
    Ok(Json(score_response(req.expert_id, &choices, &out)))
}

pub async fn score_ensemble(
    State(state): State<HttpState>,
    ApiJson(req): ApiJson<proto::ScoreEnsembleRequest>,
) -> ApiResult<Json<proto::ScoreEnsembleResponse>> {
    state.wait_for_seq(req.min_library_seq).await?;
    let out = state
        .inference()?
        .score_ensemble(EnsembleRequest {
            expert_ids: req.expert_ids.clone(),
            input: req.input,
            choices: req.choices.clone(),
            truncate: req.truncate,
        })
        .await?;
    Ok(Json(proto::ScoreEnsembleResponse {
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

pub async fn answer(
    State(state): State<HttpState>,
    ApiJson(req): ApiJson<proto::AnswerRequest>,
) -> ApiResult<Json<proto::AnswerResponse>> {
    let min_library_seq = req.min_library_seq;
    let req = answer_request(req)?;
    state.wait_for_seq(min_library_seq).await?;
    let answered = state.answerer()?.answer(req).await?;
    Ok(Json(answered_to_proto(answered)))
}

/// `ListExpertsRequest`'s fields as query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default, alias = "pageSize")]
    page_size: u32,
    #[serde(default, alias = "pageToken")]
    page_token: String,
}

pub async fn list_experts(
    State(state): State<HttpState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<proto::ListExpertsResponse>> {
    let Query(p) = params.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let size = if p.page_size == 0 {
        100
    } else {
        p.page_size as usize
    };
    let library = state.library.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let after = (!p.page_token.is_empty()).then_some(p.page_token.as_str());
        let (page, more) = library.list(after, size)?;
        let next_page_token = if more {
            page.last().map(|m| m.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok::<_, roe_expert_library::LibraryError>(proto::ListExpertsResponse {
            experts: page.iter().map(expert_to_proto).collect(),
            next_page_token,
            total: library.len() as u64,
        })
    })
    .await
    .map_err(internal)??;
    Ok(Json(listed))
}

/// `GetExpertRequest`'s options as query parameters (adapters travel over gRPC only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    #[serde(default, alias = "includeInstances")]
    include_instances: bool,
}

pub async fn get_expert(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    params: Result<Query<GetParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<proto::GetExpertResponse>> {
    let Query(p) = params.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    // An id no expert could have is the caller's mistake (400), not a missing expert (404).
    roe_serving::check_expert_id("id", &id)?;
    let library = state.library.clone();
    let got = tokio::task::spawn_blocking(move || {
        let meta = library.get(&id)?;
        let instances = if p.include_instances {
            library.instances(&id)?
        } else {
            Vec::new()
        };
        Ok::<_, roe_expert_library::LibraryError>(proto::GetExpertResponse {
            expert: Some(expert_to_proto(&meta)),
            instances: instances.into_iter().map(instance_to_proto).collect(),
            adapter: None,
        })
    })
    .await
    .map_err(internal)??;
    Ok(Json(got))
}
