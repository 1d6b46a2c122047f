//! Every conversion between `roe.v1` messages and the domain and serving types (errors
//! become statuses in [`crate::status`]).

use roe_backbone::{FinishReason, ScoreOutput};
use roe_expert_library::expert::{
    AdapterSummary, ExpertKind, ExpertMeta, Instance, PeftAdapter, TextFormat,
};
use roe_expert_library::library::{NewExpert, WriteOptions};
use roe_expert_library::merge::{MergeRequest, PromptMergeMode};
use roe_expert_library::retrieval::{
    Aggregation, EvidenceHit, ExpertScore, Query, RouteResult, Strategy,
};
use roe_serving::{
    Answer, AnswerInput, AnswerMode, AnswerRequest, Answered, ExpertRef, GenerateOptions,
    RouteOverrides, ServingError,
};
use roe_trainer::{JobSpec, JobState, JobStatus, PromptInit, Recipe, TaskSpec};
use tonic::Status;

use crate::proto;

pub fn kind_to_proto(k: ExpertKind) -> proto::ExpertKind {
    match k {
        ExpertKind::Prompt => proto::ExpertKind::Prompt,
        ExpertKind::Lora => proto::ExpertKind::Lora,
    }
}

pub fn kind_from_proto(k: i32) -> Result<Option<ExpertKind>, Status> {
    match proto::ExpertKind::try_from(k) {
        Ok(proto::ExpertKind::Unspecified) => Ok(None),
        Ok(proto::ExpertKind::Prompt) => Ok(Some(ExpertKind::Prompt)),
        Ok(proto::ExpertKind::Lora) => Ok(Some(ExpertKind::Lora)),
        Err(_) => Err(Status::invalid_argument(format!("kind: unknown value {k}"))),
    }
}

pub fn expert_to_proto(m: &ExpertMeta) -> proto::Expert {
    let mut e = proto::Expert {
        id: m.id.clone(),
        name: m.name.clone(),
        description: m.description.clone(),
        kind: kind_to_proto(m.kind) as i32,
        backbone: m.backbone.clone(),
        version: m.version,
        created_at_unix_ms: m.created_at_unix_ms,
        num_instances: m.num_instances as u64,
        weights_sha256: m.weights_sha256.clone(),
        weights_bytes: m.weights_bytes as u64,
        safetensors_sha256: m.safetensors_sha256.clone(),
        ..Default::default()
    };
    match &m.adapter {
        AdapterSummary::Prompt {
            num_virtual_tokens, ..
        } => e.num_virtual_tokens = *num_virtual_tokens as u32,
        AdapterSummary::Lora {
            r,
            alpha,
            target_modules,
            ..
        } => {
            e.lora_r = *r as u32;
            e.lora_alpha = *alpha;
            e.target_modules = target_modules.clone();
        }
    }
    e.training = m.training.as_ref().map(|t| proto::TrainingSummary {
        job_id: t.job_id.clone(),
        recipe_json: t.recipe_json.clone(),
        steps: t.steps as u32,
        final_loss: t.final_loss,
        metric: t.metric.clone(),
        held_out_score: t.held_out_score,
        held_out_baseline: t.held_out_baseline,
        held_out_rows: t.held_out_rows as u32,
        train_rows: t.train_rows as u32,
        ensemble_members: t.ensemble_members.clone(),
    });
    e
}

/// A StartTraining request as the trainer's job spec and rows: unset recipe fields take the
/// kind's defaults; values are checked by the trainer, which names the field.
pub fn training_job_from_proto(
    req: proto::StartTrainingRequest,
) -> Result<(JobSpec, Vec<Instance>), Status> {
    let kind = kind_from_proto(req.kind)?
        .ok_or_else(|| Status::invalid_argument("kind: say prompt or lora"))?;
    let mut recipe = Recipe::defaults(kind);
    let r = req.recipe.unwrap_or_default();
    let usize_of = |v: Option<u32>, d: usize| v.map(|v| v as usize).unwrap_or(d);
    recipe.steps = usize_of(r.steps, recipe.steps);
    recipe.batch_size = usize_of(r.batch_size, recipe.batch_size);
    recipe.learning_rate = r.learning_rate.unwrap_or(recipe.learning_rate);
    recipe.warmup_steps = usize_of(r.warmup_steps, recipe.warmup_steps.min(recipe.steps));
    recipe.weight_decay = r.weight_decay.unwrap_or(recipe.weight_decay);
    recipe.max_grad_norm = r.max_grad_norm.unwrap_or(recipe.max_grad_norm);
    recipe.seed = r.seed.unwrap_or(recipe.seed);
    recipe.held_out_fraction = r.held_out_fraction.unwrap_or(recipe.held_out_fraction);
    recipe.instances = usize_of(r.instances, recipe.instances);
    recipe.num_virtual_tokens = usize_of(r.num_virtual_tokens, recipe.num_virtual_tokens);
    recipe.prompt_init =
        PromptInit::parse(&r.prompt_init, &r.prompt_init_text).ok_or_else(|| {
            Status::invalid_argument(format!(
                "recipe.prompt_init: {:?} is not class_labels, random, vocab_sample or text",
                truncate(&r.prompt_init)
            ))
        })?;
    recipe.lora_rank = usize_of(r.lora_rank, recipe.lora_rank);
    recipe.lora_alpha = r.lora_alpha.unwrap_or(recipe.lora_alpha);
    if !r.lora_targets.is_empty() {
        recipe.lora_targets = r
            .lora_targets
            .iter()
            .map(|t| {
                roe_trainer::recipe::parse_target(t).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "recipe.lora_targets: {:?} is not a projection of the backbone",
                        truncate(t)
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
    }
    recipe.micro_batch_tokens = usize_of(r.micro_batch_tokens, recipe.micro_batch_tokens);
    recipe.checkpoint_every = usize_of(r.checkpoint_every, recipe.checkpoint_every);
    recipe.max_eval_rows = usize_of(r.max_eval_rows, recipe.max_eval_rows);
    Ok((
        JobSpec {
            expert_id: req.expert_id,
            name: req.name,
            description: req.description,
            task: TaskSpec {
                description: req.task_description,
                labels: req.labels,
            },
            recipe,
            new_version: req.new_version,
            ensemble_size: req.ensemble_size.max(1) as usize,
        },
        req.rows.into_iter().map(instance_from_proto).collect(),
    ))
}

/// Client text quoted in a message: at most 64 characters.
fn truncate(s: &str) -> String {
    if s.chars().count() <= 64 {
        return s.to_string();
    }
    format!("{}…", s.chars().take(64).collect::<String>())
}

/// `req` as StartTrainingStream's messages: the request without its rows, then a row each,
/// so a row set of any size fits under the message limit.
pub fn start_training_chunks(
    mut req: proto::StartTrainingRequest,
) -> impl Iterator<Item = proto::StartTrainingChunk> {
    use proto::start_training_chunk::Part;
    let rows = std::mem::take(&mut req.rows);
    std::iter::once(Part::Header(req))
        .chain(rows.into_iter().map(Part::Row))
        .map(|part| proto::StartTrainingChunk { part: Some(part) })
}

pub fn training_job_to_proto(j: &JobStatus) -> proto::TrainingJob {
    let state = match j.state {
        JobState::Queued => proto::TrainingState::Queued,
        JobState::Running => proto::TrainingState::Running,
        JobState::Succeeded => proto::TrainingState::Succeeded,
        JobState::Failed => proto::TrainingState::Failed,
        JobState::Cancelled => proto::TrainingState::Cancelled,
    };
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    proto::TrainingJob {
        id: j.id.clone(),
        expert_id: j.expert_id.clone(),
        kind: kind_to_proto(j.kind) as i32,
        state: state as i32,
        phase: j.phase.clone(),
        queue_position: j.queue_position as u32,
        step: j.step as u32,
        total_steps: j.total_steps as u32,
        loss: finite(j.loss),
        learning_rate: j.learning_rate,
        tokens_per_s: finite(j.tokens_per_s),
        steps_per_s: finite(j.steps_per_s),
        eta_s: finite(j.eta_s),
        metric: j.metric.as_str().into(),
        held_out_score: j.held_out_score,
        held_out_baseline: j.held_out_baseline,
        train_rows: j.train_rows as u32,
        held_out_rows: j.held_out_rows as u32,
        resumed_from_step: j.resumed_from_step as u32,
        expert_version: j.expert_version,
        error: j.error.clone(),
        created_at_unix_ms: j.created_at_unix_ms,
        finished_at_unix_ms: j.finished_at_unix_ms,
        expert_ids: j.expert_ids.clone(),
        member_scores: j.member_scores.clone(),
    }
}

pub fn instance_from_proto(i: proto::Instance) -> Instance {
    Instance {
        input: i.input,
        target: i.target,
        choices: i.choices,
    }
}

pub fn instance_to_proto(i: Instance) -> proto::Instance {
    proto::Instance {
        input: i.input,
        target: i.target,
        choices: i.choices,
    }
}

pub fn query_from_proto(q: proto::Query) -> Query {
    Query {
        input: q.input,
        choices: q.choices,
        target: q.target,
    }
}

/// A request's route options (its field `field`: `options` in Route, `route` in Answer) as
/// overrides of the server's defaults (the checks against limits happen in
/// [`RouteOverrides::resolve`]).
pub fn route_overrides(
    o: Option<proto::RouteOptions>,
    field: &str,
) -> Result<RouteOverrides, Status> {
    let Some(o) = o else {
        return Ok(RouteOverrides::default());
    };
    let unknown =
        |name: &str, v: i32| Status::invalid_argument(format!("{field}.{name}: unknown value {v}"));
    let strategy = match proto::Strategy::try_from(o.strategy) {
        Ok(proto::Strategy::Unspecified) => None,
        Ok(proto::Strategy::Elm) => Some(Strategy::Elm),
        Ok(proto::Strategy::Hybrid) => Some(Strategy::Hybrid),
        Err(_) => return Err(unknown("strategy", o.strategy)),
    };
    let aggregation = match proto::Aggregation::try_from(o.aggregation) {
        Ok(proto::Aggregation::Unspecified) => None,
        Ok(proto::Aggregation::Vote) => Some(Aggregation::Vote),
        Ok(proto::Aggregation::SimilaritySum) => Some(Aggregation::SimilaritySum),
        Err(_) => return Err(unknown("aggregation", o.aggregation)),
    };
    let text_format = match proto::TextFormat::try_from(o.text_format) {
        Ok(proto::TextFormat::Unspecified) => None,
        Ok(proto::TextFormat::Instance) => Some(TextFormat::Instance),
        Ok(proto::TextFormat::ChoiceInstance) => Some(TextFormat::ChoiceInstance),
        Err(_) => return Err(unknown("text_format", o.text_format)),
    };
    let kind = kind_from_proto(o.kind)
        .map_err(|s| Status::invalid_argument(format!("{field}.{}", s.message())))?;
    Ok(RouteOverrides {
        strategy,
        top_k: (o.top_k != 0).then_some(o.top_k),
        aggregation,
        text_format,
        kind,
        exclude: o.exclude,
        abstain_threshold: o.abstain_threshold,
        exact: o.exact,
        evidence_per_query: (o.evidence_per_query != 0).then_some(o.evidence_per_query),
    })
}

/// Overrides as the options of a request to a remote router.
pub fn route_overrides_to_proto(o: &RouteOverrides) -> proto::RouteOptions {
    proto::RouteOptions {
        strategy: match o.strategy {
            None => proto::Strategy::Unspecified,
            Some(Strategy::Elm) => proto::Strategy::Elm,
            Some(Strategy::Hybrid) => proto::Strategy::Hybrid,
        } as i32,
        top_k: o.top_k.unwrap_or(0),
        aggregation: match o.aggregation {
            None => proto::Aggregation::Unspecified,
            Some(Aggregation::Vote) => proto::Aggregation::Vote,
            Some(Aggregation::SimilaritySum) => proto::Aggregation::SimilaritySum,
        } as i32,
        text_format: match o.text_format {
            None => proto::TextFormat::Unspecified,
            Some(TextFormat::Instance) => proto::TextFormat::Instance,
            Some(TextFormat::ChoiceInstance) => proto::TextFormat::ChoiceInstance,
        } as i32,
        kind: o.kind.map_or(proto::ExpertKind::Unspecified, kind_to_proto) as i32,
        exclude: o.exclude.clone(),
        abstain_threshold: o.abstain_threshold,
        exact: o.exact,
        evidence_per_query: o.evidence_per_query.unwrap_or(0),
    }
}

pub fn query_to_proto(q: Query) -> proto::Query {
    proto::Query {
        input: q.input,
        choices: q.choices,
        target: q.target,
    }
}

/// A remote router's answer as the domain's result.
pub fn route_result_from_proto(r: proto::RouteResponse) -> RouteResult {
    RouteResult {
        ranked: r
            .ranked
            .into_iter()
            .map(|s| ExpertScore {
                expert_id: s.expert_id,
                score: s.score,
                votes: s.votes,
                share: s.share,
                mean_similarity: s.mean_similarity,
                centroid_similarity: s.centroid_similarity,
                lexical_similarity: s.lexical_similarity,
            })
            .collect(),
        evidence: r
            .evidence
            .into_iter()
            .map(|q| {
                q.hits
                    .into_iter()
                    .map(|h| EvidenceHit {
                        expert_id: h.expert_id,
                        point_id: h.point_id,
                        similarity: h.similarity,
                    })
                    .collect()
            })
            .collect(),
        abstain: r.abstain,
    }
}

pub fn route_result_to_proto(r: RouteResult) -> proto::RouteResponse {
    let expert_id = r.winner().map(|w| w.expert_id.clone()).unwrap_or_default();
    proto::RouteResponse {
        ranked: r
            .ranked
            .into_iter()
            .map(|s| proto::ExpertRanking {
                expert_id: s.expert_id,
                score: s.score,
                votes: s.votes,
                share: s.share,
                mean_similarity: s.mean_similarity,
                centroid_similarity: s.centroid_similarity,
                lexical_similarity: s.lexical_similarity,
            })
            .collect(),
        evidence: r
            .evidence
            .into_iter()
            .map(|hits| proto::QueryEvidence {
                hits: hits
                    .into_iter()
                    .map(|h| proto::EvidenceHit {
                        expert_id: h.expert_id,
                        point_id: h.point_id,
                        similarity: h.similarity,
                    })
                    .collect(),
            })
            .collect(),
        abstain: r.abstain,
        expert_id,
    }
}

/// A remote library's expert metadata; a response without it, or with a kind this side does
/// not know, is the library's fault.
pub fn expert_ref_from_proto(
    id: &str,
    e: Option<proto::Expert>,
) -> Result<ExpertRef, ServingError> {
    let e = e.ok_or_else(|| {
        ServingError::internal(format!("the expert library sent no metadata for {id:?}"))
    })?;
    let kind = match proto::ExpertKind::try_from(e.kind) {
        Ok(proto::ExpertKind::Prompt) => ExpertKind::Prompt,
        Ok(proto::ExpertKind::Lora) => ExpertKind::Lora,
        _ => {
            return Err(ServingError::internal(format!(
                "the expert library sent expert {id:?} with kind {}",
                e.kind
            )))
        }
    };
    Ok(ExpertRef {
        id: e.id,
        kind,
        backbone: e.backbone,
        version: e.version,
        weights_sha256: e.weights_sha256,
        weights_bytes: e.weights_bytes as usize,
    })
}

pub fn score_response(
    expert_id: String,
    choices: &[String],
    out: &ScoreOutput,
) -> proto::ScoreResponse {
    proto::ScoreResponse {
        choices: choices
            .iter()
            .zip(&out.choices)
            .map(|(choice, s)| proto::ChoiceScore {
                choice: choice.clone(),
                sum_logprob: s.sum_logprob,
                mean_logprob: s.mean_logprob,
                num_tokens: s.num_tokens as u32,
            })
            .collect(),
        best: out.best as u32,
        best_by_mean: out.best_by_mean as u32,
        expert_id,
        prompt_tokens: out.prompt_tokens as u32,
        truncated_tokens: out.truncated_tokens as u32,
    }
}

pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

pub fn generate_options(req: &proto::GenerateRequest) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: req.max_new_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
    }
}

pub fn answer_request(req: proto::AnswerRequest) -> Result<AnswerRequest, Status> {
    let mode = match proto::AnswerMode::try_from(req.mode) {
        Ok(proto::AnswerMode::Unspecified) => AnswerMode::Auto,
        Ok(proto::AnswerMode::Score) => AnswerMode::Score,
        Ok(proto::AnswerMode::Generate) => AnswerMode::Generate,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "mode: unknown value {}",
                req.mode
            )))
        }
    };
    Ok(AnswerRequest {
        queries: req.queries.into_iter().map(query_from_proto).collect(),
        inputs: req
            .inputs
            .into_iter()
            .map(|i| AnswerInput {
                input: i.input,
                choices: i.choices,
            })
            .collect(),
        mode,
        route: route_overrides(req.route, "route")?,
        generate: GenerateOptions {
            max_new_tokens: req.max_new_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop,
        },
        truncate: req.truncate,
    })
}

pub fn answered_to_proto(a: Answered) -> proto::AnswerResponse {
    let expert_id = a.expert_id;
    proto::AnswerResponse {
        answers: a
            .answers
            .into_iter()
            .map(|answer| proto::Answer {
                kind: Some(match answer {
                    Answer::Scored { choices, output } => proto::answer::Kind::Score(
                        score_response(expert_id.clone(), &choices, &output),
                    ),
                    Answer::Generated {
                        text,
                        finish,
                        usage,
                    } => proto::answer::Kind::Generated(proto::Generated {
                        text,
                        finish_reason: finish_name(finish).to_string(),
                        prompt_tokens: usage.prompt_tokens as u32,
                        truncated_tokens: usage.truncated_tokens as u32,
                    }),
                }),
            })
            .collect(),
        routing: Some(route_result_to_proto(a.routing)),
        expert_id,
        fell_back: a.fell_back,
        fallback_reason: a.fallback_reason,
    }
}

/// A RegisterExpert request (or a stream's header with its chunks put together) as the
/// library's [`NewExpert`] and whether it may replace an existing version; the announced
/// length and SHA-256 are checked against the bytes received.
pub fn new_expert(req: proto::RegisterExpertRequest) -> Result<(NewExpert, bool), Status> {
    let adapter = req
        .adapter
        .ok_or_else(|| Status::invalid_argument("adapter: missing"))?;
    let received = adapter.adapter_model_safetensors.len() as u64;
    if let Some(announced) = req.safetensors_bytes {
        if announced != received {
            return Err(Status::invalid_argument(format!(
                "safetensors_bytes: {announced} announced, {received} received"
            )));
        }
    }
    let adapter = PeftAdapter {
        config_json: adapter.adapter_config_json,
        safetensors: adapter.adapter_model_safetensors,
    };
    if !req.safetensors_sha256.is_empty() {
        let sha = adapter.safetensors_sha256_hex();
        if !req.safetensors_sha256.trim().eq_ignore_ascii_case(&sha) {
            return Err(Status::invalid_argument(format!(
                "safetensors_sha256: {:?} announced, {sha} received",
                req.safetensors_sha256.chars().take(80).collect::<String>()
            )));
        }
    }
    Ok((
        NewExpert {
            id: req.id,
            name: req.name,
            description: req.description,
            backbone: (!req.backbone.is_empty()).then_some(req.backbone),
            adapter,
            instances: req.instances.into_iter().map(instance_from_proto).collect(),
        },
        req.new_version,
    ))
}

/// A write's `expected_version` as the library's compare-and-set (unset: no check).
pub fn write_options(expected_version: Option<u64>) -> WriteOptions {
    WriteOptions { expected_version }
}

/// A MergeExperts request as the library's [`MergeRequest`]: weights on every source or on
/// none, a known prompt mode.
pub fn merge_request(req: proto::MergeExpertsRequest) -> Result<MergeRequest, Status> {
    let prompt_mode = match proto::PromptMergeMode::try_from(req.prompt_mode) {
        Ok(proto::PromptMergeMode::Unspecified | proto::PromptMergeMode::Average) => {
            PromptMergeMode::Average
        }
        Ok(proto::PromptMergeMode::Concat) => PromptMergeMode::Concat,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "prompt_mode: unknown value {}",
                req.prompt_mode
            )))
        }
    };
    let weighted = req.sources.iter().filter(|s| s.weight.is_some()).count();
    let weights = if weighted == 0 {
        None
    } else if weighted == req.sources.len() {
        Some(req.sources.iter().filter_map(|s| s.weight).collect())
    } else {
        let i = req
            .sources
            .iter()
            .position(|s| s.weight.is_none())
            .unwrap_or_default();
        return Err(Status::invalid_argument(format!(
            "sources[{i}].weight: missing; set a weight on every source or on none (uniform)"
        )));
    };
    Ok(MergeRequest {
        id: req.id,
        name: req.name,
        description: req.description,
        sources: req.sources.into_iter().map(|s| s.expert_id).collect(),
        weights,
        prompt_mode,
        new_version: req.new_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_options_round_trip_and_unknown_enums_name_the_field() {
        let o = proto::RouteOptions {
            strategy: proto::Strategy::Elm as i32,
            top_k: 3,
            text_format: proto::TextFormat::Instance as i32,
            kind: proto::ExpertKind::Lora as i32,
            exclude: vec!["a".into()],
            abstain_threshold: Some(0.25),
            evidence_per_query: 2,
            ..Default::default()
        };
        let overrides = route_overrides(Some(o.clone()), "options").unwrap();
        assert_eq!(overrides.top_k, Some(3));
        assert_eq!(route_overrides_to_proto(&overrides), o);
        let bad = proto::RouteOptions {
            strategy: 9,
            ..Default::default()
        };
        let e = route_overrides(Some(bad.clone()), "options").unwrap_err();
        assert!(e.message().starts_with("options.strategy"), "{e:?}");
        let e = route_overrides(Some(bad), "route").unwrap_err();
        assert!(e.message().starts_with("route.strategy"), "{e:?}");
        let e = answer_request(proto::AnswerRequest {
            mode: 7,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.message().starts_with("mode"), "{e:?}");
    }
}
