//! Route a task and answer its inputs with the winning expert in one call.
//!
//! The client sends example queries of its task (or only the inputs it wants answered, which
//! then serve as the queries). The [`Answerer`] routes them, answers every input with the
//! winner — rank classification through the Score queue (one call's inputs in one batch), or
//! generation (one call's inputs submitted together, so they share decode steps) — and
//! returns the routing evidence. When routing abstains, the configured fallback (the bare
//! backbone or a merged expert: `roe serve --fallback-expert`) answers, and the result says
//! so.

use std::sync::Arc;

use roe_backbone::{FinishReason, GenerateParams, ScoreOutput};
use roe_expert_library::{Query, RouteResult};

use crate::backend::{Backend, PromptFormat};
use crate::context::PromptUsage;
use crate::error::{Result, ServingError};
use crate::generation_queue::GenerationRequest;
use crate::inference::{Inference, PromptCheck};
use crate::routing::{RouteOverrides, RouteService};
use crate::score_queue::ScoreItem;
use crate::validate::GenerateOptions;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AnswerMode {
    /// Score when every input has choices, else generate.
    #[default]
    Auto,
    Score,
    Generate,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerInput {
    pub input: String,
    pub choices: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AnswerRequest {
    pub queries: Vec<Query>,
    pub inputs: Vec<AnswerInput>,
    pub mode: AnswerMode,
    pub route: RouteOverrides,
    pub generate: GenerateOptions,
    /// Cut each input's prompt from the front when it does not fit (see [`crate::context`]),
    /// instead of CONTEXT_LENGTH_EXCEEDED.
    pub truncate: bool,
}

#[derive(Debug, Clone)]
pub enum Answer {
    Scored {
        choices: Vec<String>,
        output: ScoreOutput,
    },
    Generated {
        text: String,
        finish: FinishReason,
        /// What was read of the input's prompt.
        usage: PromptUsage,
    },
}

#[derive(Debug, Clone)]
pub struct Answered {
    pub routing: RouteResult,
    /// The expert that answered ("" = the bare backbone).
    pub expert_id: String,
    pub fell_back: bool,
    pub fallback_reason: String,
    pub answers: Vec<Answer>,
}

/// The expert a routed task goes to, and why.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub routing: RouteResult,
    /// The winner, or the fallback ("" = the bare backbone) when routing abstained.
    pub expert_id: String,
    pub fell_back: bool,
    /// Why routing abstained (empty when it did not).
    pub fallback_reason: String,
}

/// What to answer, after the checks.
#[derive(Debug)]
enum Work {
    Score(Vec<AnswerInput>),
    Generate(Vec<AnswerInput>, GenerateParams),
}

pub struct Answerer<B: Backend> {
    inference: Arc<Inference<B>>,
    router: Arc<dyn RouteService>,
    /// Answers when routing abstains; empty: the bare backbone.
    fallback_expert: String,
}

impl<B: Backend> Answerer<B> {
    /// `fallback_expert` ("" = bare backbone) should have been checked with
    /// [`Inference::check_expert`] at start-up; if it disappears later, abstaining calls fail
    /// with FAILED_PRECONDITION.
    pub fn new(
        inference: Arc<Inference<B>>,
        router: Arc<dyn RouteService>,
        fallback_expert: impl Into<String>,
    ) -> Self {
        Self {
            inference,
            router,
            fallback_expert: fallback_expert.into(),
        }
    }

    /// Routes a task and picks the expert that answers it: the winner, or the server's
    /// fallback when routing abstains. Router errors name their options `route.*`.
    pub async fn choose(&self, queries: Vec<Query>, route: RouteOverrides) -> Result<Chosen> {
        let req_threshold = route.abstain_threshold;
        // The router names its options `options.*`; here they are `route.*`.
        let routing = self.router.route(queries, route).await.map_err(|e| {
            match e.message.strip_prefix("options.") {
                Some(rest) => ServingError::new(e.kind, format!("route.{rest}")),
                None => e,
            }
        })?;
        let winner = routing.winner().map(|w| w.expert_id.clone());
        let (expert_id, fell_back, fallback_reason) = match winner {
            Some(id) => (id, false, String::new()),
            None => (
                self.fallback_expert.clone(),
                true,
                self.fallback_reason(req_threshold, &routing),
            ),
        };
        Ok(Chosen {
            routing,
            expert_id,
            fell_back,
            fallback_reason,
        })
    }

    pub async fn answer(&self, req: AnswerRequest) -> Result<Answered> {
        let (queries, work) = plan(&self.inference.config().limits, &req)?;
        let Chosen {
            routing,
            expert_id,
            fell_back,
            fallback_reason,
        } = self.choose(queries, req.route).await?;
        let expert = match self.inference.resolve(&expert_id).await {
            Ok(e) => e,
            // The configured fallback was deleted (or replaced by one that no longer fits)
            // after start-up: a server configuration problem, not the caller's.
            Err(e) if fell_back => {
                return Err(ServingError::precondition(format!(
                    "routing abstained and the fallback expert {expert_id:?} \
                     (roe serve --fallback-expert) cannot be used: {}",
                    e.message
                )))
            }
            Err(e) => return Err(e.prefixed(&format!("routed expert {expert_id:?}"))),
        };
        // Where each input came from, to name it in an error.
        let field = |n: usize| {
            if req.inputs.is_empty() {
                format!("queries[{n}].input")
            } else {
                format!("inputs[{n}].input")
            }
        };
        let answers = match work {
            Work::Score(inputs) => {
                let mut items = Vec::with_capacity(inputs.len());
                for (n, i) in inputs.iter().enumerate() {
                    let fit = self
                        .inference
                        .fit_prompt(
                            PromptCheck::scoring(&field(n), &i.input, &i.choices, req.truncate),
                            expert.as_ref(),
                        )
                        .await?;
                    items.push(ScoreItem {
                        expert: expert.clone(),
                        input: i.input.clone(),
                        choices: i.choices.clone(),
                        keep: fit.keep,
                    });
                }
                let outs = self.inference.score_items(items).await?;
                inputs
                    .into_iter()
                    .zip(outs)
                    .map(|(i, output)| Answer::Scored {
                        choices: i.choices,
                        output,
                    })
                    .collect()
            }
            Work::Generate(inputs, params) => {
                let mut requests = Vec::with_capacity(inputs.len());
                let mut usages = Vec::with_capacity(inputs.len());
                for (n, i) in inputs.into_iter().enumerate() {
                    let fit = self
                        .inference
                        .fit_prompt(
                            PromptCheck::generation(
                                &field(n),
                                &i.input,
                                PromptFormat::Canonical,
                                params.max_new_tokens,
                                req.truncate,
                            ),
                            expert.as_ref(),
                        )
                        .await?;
                    usages.push(fit.usage);
                    requests.push(GenerationRequest {
                        expert: expert.clone(),
                        input: i.input,
                        format: PromptFormat::Canonical,
                        params: params.clone(),
                        keep: fit.keep,
                    });
                }
                let mut answers = Vec::new();
                for (n, (text, usage)) in self
                    .inference
                    .generate_texts(requests)
                    .await
                    .into_iter()
                    .zip(usages)
                    .enumerate()
                {
                    let (text, finish) = text.map_err(|e| e.prefixed(&format!("inputs[{n}]")))?;
                    answers.push(Answer::Generated {
                        text,
                        finish,
                        usage,
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
        Ok(Answered {
            routing,
            expert_id,
            fell_back,
            fallback_reason,
            answers,
        })
    }

    /// Why routing gave no winner, for `fallback_reason`.
    fn fallback_reason(&self, req_threshold: Option<f32>, routing: &RouteResult) -> String {
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

/// Checks everything but the queries (the router checks those) before any work is done.
fn plan(limits: &crate::config::RequestLimits, req: &AnswerRequest) -> Result<(Vec<Query>, Work)> {
    if req.queries.is_empty() && req.inputs.is_empty() {
        return Err(ServingError::invalid(
            "inputs",
            "nothing to answer (queries and inputs are both empty)",
        ));
    }
    // Inputs taken from the queries are reported under the field the client filled.
    let (inputs, field) = if req.inputs.is_empty() {
        let inputs = req
            .queries
            .iter()
            .map(|q| AnswerInput {
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
            .map(|i| Query {
                input: i.input.clone(),
                choices: i.choices.clone(),
                target: None,
            })
            .collect()
    } else {
        req.queries.clone()
    };
    let generate = match req.mode {
        AnswerMode::Auto => inputs.iter().any(|i| i.choices.is_empty()),
        AnswerMode::Score => false,
        AnswerMode::Generate => true,
    };
    let limit = if generate {
        limits.max_answer_generate_inputs
    } else {
        limits.max_answer_score_inputs
    };
    if inputs.len() > limit {
        let what = if generate { "generate" } else { "score" };
        let from = if field == "queries" {
            " (the queries, as no inputs were given)"
        } else {
            ""
        };
        return Err(ServingError::too_large(
            "inputs",
            format!("{} to {what}{from}, at most {limit} per call", inputs.len()),
        ));
    }
    if generate {
        // The options first: a bad stop string is named as such, not as an input too long.
        // One seed for every input: a seeded call is reproducible as a whole.
        let params = limits.generate_params(&req.generate)?;
        let stop_bytes = req.generate.stop_bytes();
        for (i, inp) in inputs.iter().enumerate() {
            limits.check_text_input(&format!("{field}[{i}]."), &inp.input, stop_bytes)?;
        }
        limits.check_work(field, inputs.iter().map(|i| i.input.len()).sum())?;
        Ok((queries, Work::Generate(inputs, params)))
    } else {
        for (i, inp) in inputs.iter().enumerate() {
            limits.check_score_input(&format!("{field}[{i}]."), &inp.input, &inp.choices)?;
        }
        let work = inputs
            .iter()
            .map(|i| i.input.len() + i.choices.iter().map(String::len).sum::<usize>())
            .sum();
        limits.check_work(field, work)?;
        Ok((queries, Work::Score(inputs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RequestLimits;
    use crate::error::ErrorKind;

    fn input(text: &str, choices: &[&str]) -> AnswerInput {
        AnswerInput {
            input: text.to_string(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn mode_follows_the_inputs_choices_unless_asked() {
        let limits = RequestLimits::default();
        let mut req = AnswerRequest {
            inputs: vec![input("a", &["x", "y"]), input("b", &["x"])],
            ..Default::default()
        };
        let (queries, work) = plan(&limits, &req).unwrap();
        assert!(matches!(work, Work::Score(ref v) if v.len() == 2));
        // No queries: the inputs are the queries.
        assert_eq!(queries.len(), 2);
        assert_eq!(queries[1].input, "b");
        req.inputs.push(input("c", &[]));
        assert!(matches!(plan(&limits, &req).unwrap().1, Work::Generate(..)));
        req.mode = AnswerMode::Score;
        let e = plan(&limits, &req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("inputs[2].choices"), "{e:?}");
    }

    #[test]
    fn queries_are_answered_when_no_inputs_are_given() {
        let limits = RequestLimits::default();
        let req = AnswerRequest {
            queries: vec![
                Query {
                    input: "q0".into(),
                    choices: vec!["a".into()],
                    target: Some("a".into()),
                },
                Query {
                    input: " ".into(),
                    choices: vec!["a".into()],
                    target: None,
                },
            ],
            ..Default::default()
        };
        let e = plan(&limits, &req).unwrap_err();
        assert!(e.message.starts_with("queries[1].input"), "{e:?}");
        let mut ok = req.clone();
        ok.queries.pop();
        let (queries, work) = plan(&limits, &ok).unwrap();
        // Labeled queries keep their targets for routing.
        assert_eq!(queries[0].target.as_deref(), Some("a"));
        assert!(matches!(work, Work::Score(ref v) if v[0].input == "q0"));
    }

    #[test]
    fn limits_name_the_inputs() {
        let limits = RequestLimits::default();
        let req = AnswerRequest {
            inputs: (0..=limits.max_answer_score_inputs)
                .map(|_| input("x", &["a"]))
                .collect(),
            ..Default::default()
        };
        let e = plan(&limits, &req).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        assert!(e.message.starts_with("inputs:"), "{e:?}");
        let req = AnswerRequest {
            inputs: (0..=limits.max_answer_generate_inputs)
                .map(|_| input("x", &[]))
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            plan(&limits, &req).unwrap_err().kind,
            ErrorKind::ResourceExhausted
        );
        let e = plan(&limits, &AnswerRequest::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("inputs:"), "{e:?}");
        let req = AnswerRequest {
            inputs: vec![input("x", &[])],
            generate: GenerateOptions {
                temperature: 9.0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(plan(&limits, &req)
            .unwrap_err()
            .message
            .starts_with("temperature"));
    }
}
