//! How much of a prompt one request may have the backbone read: the backbone's context less
//! what the answer needs (its longest choice, or its new tokens) and what the expert's soft
//! prompt takes, within the per-request budget (`--max-input-length`). Past it a request is
//! refused naming its field (OpenAI's `context_length_exceeded` over HTTP), or, when it asks
//! for it (`truncate`, as text-embeddings-inference has it), cut from the front, and the cut
//! reported. Nothing is ever cut silently.

use crate::error::{Result, ServingError};

/// Token counts of one request's text, as the backend renders it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptCount {
    /// Ids of the rendered prompt (soft-prompt tokens apart).
    pub prompt: usize,
    /// Ids of the longest choice's continuation (0 without choices).
    pub longest_choice: usize,
}

/// What a response reports of its prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptUsage {
    /// Prompt ids read.
    pub prompt_tokens: usize,
    /// Prompt ids cut from the front before reading (the request asked for it).
    pub truncated_tokens: usize,
}

/// How a request's prompt fits: what to report, and the ids to keep when cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptFit {
    pub usage: PromptUsage,
    /// Keep only the last this many prompt ids (None: all of them).
    pub keep: Option<usize>,
}

/// Where a request's prompt must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextBudget {
    /// Positions the backbone reads (8,192 for SmolLM2).
    pub context: usize,
    /// Most input positions (prompt and soft prompt) of one request.
    pub max_input_tokens: usize,
}

/// What the answer of a request needs beside its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Scoring: the longest choice's continuation ids.
    Choices(usize),
    /// Generation: up to this many new tokens.
    NewTokens(usize),
}

impl Reserve {
    fn tokens(self) -> usize {
        match self {
            Reserve::Choices(n) | Reserve::NewTokens(n) => n,
        }
    }

    fn describe(self) -> String {
        match self {
            Reserve::Choices(n) => format!("{n} for the longest choice"),
            Reserve::NewTokens(n) => format!("{n} for the new tokens asked for"),
        }
    }
}

/// Checks that `prompt` ids (and `soft_prompt` virtual tokens) fit `budget` beside
/// `reserve`; past it, cuts the prompt from the front when `truncate`, else refuses it as
/// CONTEXT_LENGTH_EXCEEDED naming `field`.
pub fn fit_prompt(
    field: &str,
    prompt: usize,
    soft_prompt: usize,
    reserve: Reserve,
    budget: ContextBudget,
    truncate: bool,
) -> Result<PromptFit> {
    let by_context = budget.context.saturating_sub(reserve.tokens());
    let limit = budget.max_input_tokens.min(by_context);
    let whole = PromptFit {
        usage: PromptUsage {
            prompt_tokens: prompt,
            truncated_tokens: 0,
        },
        keep: None,
    };
    if prompt + soft_prompt <= limit {
        return Ok(whole);
    }
    let why = if limit == budget.max_input_tokens && limit < by_context {
        format!("max_input_length is {limit}")
    } else {
        format!(
            "the backbone reads {} tokens, {}",
            budget.context,
            reserve.describe()
        )
    };
    let soft = if soft_prompt > 0 {
        format!(", {soft_prompt} of them the expert's soft prompt")
    } else {
        String::new()
    };
    if truncate && limit > soft_prompt {
        let keep = limit - soft_prompt;
        return Ok(PromptFit {
            usage: PromptUsage {
                prompt_tokens: keep,
                truncated_tokens: prompt - keep,
            },
            keep: Some(keep),
        });
    }
    let advice = if limit > soft_prompt {
        format!(
            "shorten it, or set truncate to keep its last {} tokens",
            limit - soft_prompt
        )
    } else {
        format!(
            "the answer's {} tokens and the expert's soft prompt leave no room for it",
            reserve.tokens()
        )
    };
    Err(ServingError::context_length(
        field,
        format!(
            "{} tokens{soft}, more than the {limit} this request may have ({why}): {advice}",
            prompt + soft_prompt
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const BUDGET: ContextBudget = ContextBudget {
        context: 8192,
        max_input_tokens: 8192,
    };

    #[test]
    fn a_prompt_that_fits_is_read_whole() {
        let fit = fit_prompt("input", 8000, 20, Reserve::NewTokens(64), BUDGET, false).unwrap();
        assert_eq!(fit.keep, None);
        assert_eq!(fit.usage.prompt_tokens, 8000);
        assert_eq!(fit.usage.truncated_tokens, 0);
        // Exactly at the limit.
        let fit = fit_prompt("input", 8128, 0, Reserve::NewTokens(64), BUDGET, false).unwrap();
        assert_eq!(fit.keep, None);
    }

    #[test]
    fn past_the_context_it_is_refused_naming_the_field_and_the_reserve() {
        let e = fit_prompt(
            "inputs[3].input",
            8129,
            0,
            Reserve::NewTokens(64),
            BUDGET,
            false,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLengthExceeded);
        assert!(
            e.message
                .starts_with("inputs[3].input: 8129 tokens, more than the 8128"),
            "{e}"
        );
        assert!(e.message.contains("64 for the new tokens asked for"), "{e}");
        assert!(e.message.contains("truncate to keep its last 8128"), "{e}");
        let e = fit_prompt("input", 8170, 10, Reserve::Choices(13), BUDGET, false).unwrap_err();
        assert!(
            e.message
                .contains("8180 tokens, 10 of them the expert's soft prompt"),
            "{e}"
        );
        assert!(e.message.contains("13 for the longest choice"), "{e}");
    }

    #[test]
    fn truncation_keeps_the_last_ids_that_fit_and_reports_the_cut() {
        let fit = fit_prompt("input", 32000, 20, Reserve::NewTokens(100), BUDGET, true).unwrap();
        assert_eq!(fit.keep, Some(8192 - 100 - 20));
        assert_eq!(fit.usage.prompt_tokens, 8072);
        assert_eq!(fit.usage.truncated_tokens, 32000 - 8072);
        // A soft prompt that leaves no room cannot be helped by cutting the input.
        let e = fit_prompt("input", 50, 8150, Reserve::NewTokens(64), BUDGET, true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ContextLengthExceeded);
        assert!(e.message.contains("leave no room"), "{e}");
    }

    #[test]
    fn the_per_request_budget_binds_below_the_context() {
        let budget = ContextBudget {
            context: 8192,
            max_input_tokens: 2048,
        };
        let e = fit_prompt("input", 3000, 0, Reserve::Choices(5), budget, false).unwrap_err();
        assert!(e.message.contains("max_input_length is 2048"), "{e}");
        let fit = fit_prompt("input", 3000, 0, Reserve::Choices(5), budget, true).unwrap();
        assert_eq!(fit.keep, Some(2048));
        assert_eq!(fit.usage.truncated_tokens, 952);
    }
}
