//! Conversions between `roe.v1` messages and the domain types, and the one place where
//! domain errors become gRPC statuses.

use roe_expert_library::expert::{AdapterSummary, ExpertKind, ExpertMeta, Instance, TextFormat};
use roe_expert_library::retrieval::{Aggregation, Query, RouteOptions, RouteResult, Strategy};
use roe_expert_library::LibraryError;
use tonic::{Code, Status};

use crate::proto;

pub fn status(e: LibraryError) -> Status {
    let code = match &e {
        LibraryError::InvalidArgument { .. } => Code::InvalidArgument,
        LibraryError::NotFound { .. } => Code::NotFound,
        LibraryError::AlreadyExists { .. } => Code::AlreadyExists,
        LibraryError::FailedPrecondition(_) => Code::FailedPrecondition,
        LibraryError::ResourceExhausted(_) => Code::ResourceExhausted,
        LibraryError::Storage(_)
        | LibraryError::Encoder(_)
        | LibraryError::Index(_)
        | LibraryError::Io { .. } => {
            tracing::error!(error = %e, "internal error");
            Code::Internal
        }
    };
    Status::new(code, e.to_string())
}

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
    e
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

/// Request options onto the domain's, starting from the server's defaults.
pub fn route_options(
    o: Option<proto::RouteOptions>,
    defaults: &RouteOptions,
) -> Result<RouteOptions, Status> {
    let Some(o) = o else {
        return Ok(defaults.clone());
    };
    let strategy = match proto::Strategy::try_from(o.strategy) {
        Ok(proto::Strategy::Unspecified) => defaults.strategy,
        Ok(proto::Strategy::Elm) => Strategy::Elm,
        Ok(proto::Strategy::Hybrid) => Strategy::Hybrid,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "options.strategy: unknown value {}",
                o.strategy
            )))
        }
    };
    // ELM's own defaults when it is asked for by name.
    let base = if strategy == Strategy::Elm && defaults.strategy != Strategy::Elm {
        RouteOptions::elm(defaults.text_format)
    } else {
        defaults.clone()
    };
    let aggregation = match proto::Aggregation::try_from(o.aggregation) {
        Ok(proto::Aggregation::Unspecified) => base.aggregation,
        Ok(proto::Aggregation::Vote) => Aggregation::Vote,
        Ok(proto::Aggregation::SimilaritySum) => Aggregation::SimilaritySum,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "options.aggregation: unknown value {}",
                o.aggregation
            )))
        }
    };
    let text_format = match proto::TextFormat::try_from(o.text_format) {
        Ok(proto::TextFormat::Unspecified) => base.text_format,
        Ok(proto::TextFormat::Instance) => TextFormat::Instance,
        Ok(proto::TextFormat::ChoiceInstance) => TextFormat::ChoiceInstance,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "options.text_format: unknown value {}",
                o.text_format
            )))
        }
    };
    let kind = kind_from_proto(o.kind)
        .map_err(|s| Status::invalid_argument(format!("options.{}", s.message())))?;
    if o.top_k > 1000 {
        return Err(Status::invalid_argument("options.top_k: at most 1000"));
    }
    if o.evidence_per_query > 100 {
        return Err(Status::invalid_argument(
            "options.evidence_per_query: at most 100",
        ));
    }
    let abstain_threshold = match o.abstain_threshold {
        Some(t) if !(0.0..=1.0).contains(&t) => {
            return Err(Status::invalid_argument(
                "options.abstain_threshold: must be within [0, 1]",
            ))
        }
        Some(t) => t,
        None => base.abstain_threshold,
    };
    Ok(RouteOptions {
        strategy,
        top_k: if o.top_k == 0 {
            base.top_k
        } else {
            o.top_k as usize
        },
        aggregation,
        text_format,
        kind,
        exclude: o.exclude,
        abstain_threshold,
        exact: o.exact,
        hybrid: base.hybrid,
        evidence_per_query: if o.evidence_per_query == 0 {
            base.evidence_per_query
        } else {
            o.evidence_per_query as usize
        },
    })
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
