//! Request checks shared by Score, ScoreEnsemble, Generate and Answer: every message names
//! the field (with a prefix such as `inputs[2].` where one call carries several inputs).

use roe_backbone::GenerateParams;
use roe_expert_library::LibraryError;

use crate::config::RequestLimits;
use crate::error::{Result, ServingError};

/// An expert id a client names, checked before it is looked up: an id no expert could have
/// been registered under (over 128 characters, outside the id alphabet, an empty segment) is
/// the caller's mistake, INVALID_ARGUMENT naming `field`, not an expert NOT_FOUND. The empty
/// id (the bare backbone, where a request allows it) is the caller's to handle first.
pub fn check_expert_id(field: &str, id: &str) -> Result<()> {
    roe_expert_library::validate_expert_id(id).map_err(|e| match e {
        // The library names the field `id`; the request may call it otherwise.
        LibraryError::InvalidArgument { message, .. } => ServingError::invalid(field, message),
        other => ServingError::from(other),
    })
}

/// Longest stop string (bytes).
pub const MAX_STOP_BYTES: usize = 256;

/// How to generate, as a client asks for it (zeros mean "the default").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    /// 0: the server's default.
    pub max_new_tokens: u32,
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off (1.0).
    pub top_p: f32,
    /// None: a random seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl GenerateOptions {
    /// Bytes of the stop strings, counted against the input budget.
    pub fn stop_bytes(&self) -> usize {
        self.stop.iter().map(String::len).sum()
    }
}

impl RequestLimits {
    /// The text of an input; `extra` bytes (choices, stop strings) count against the same
    /// budget. `prefix` goes before the field name.
    pub fn check_text_input(&self, prefix: &str, input: &str, extra: usize) -> Result<()> {
        if input.trim().is_empty() {
            return Err(ServingError::invalid(
                &format!("{prefix}input"),
                "must not be empty",
            ));
        }
        if input.len() + extra > self.max_input_bytes {
            return Err(ServingError::too_large(
                &format!("{prefix}input"),
                format!("more than {} bytes", self.max_input_bytes),
            ));
        }
        Ok(())
    }

    /// The input and choices of one scoring.
    pub fn check_score_input(&self, prefix: &str, input: &str, choices: &[String]) -> Result<()> {
        if choices.is_empty() {
            return Err(ServingError::invalid(
                &format!("{prefix}choices"),
                "at least one is required",
            ));
        }
        if choices.len() > self.max_choices {
            return Err(ServingError::invalid(
                &format!("{prefix}choices"),
                format!("at most {}", self.max_choices),
            ));
        }
        if let Some((j, c)) = choices
            .iter()
            .enumerate()
            .find(|(_, c)| c.len() > self.max_choice_bytes)
        {
            return Err(ServingError::too_large(
                &format!("{prefix}choices[{j}]"),
                format!("{} bytes, at most {}", c.len(), self.max_choice_bytes),
            ));
        }
        self.check_text_input(prefix, input, choices.iter().map(String::len).sum())
    }

    /// The text one call has the backbone read (`bytes`, over all its inputs, choices and
    /// members) against `max_work_bytes`; `field` is what the client would cut down.
    pub fn check_work(&self, field: &str, bytes: usize) -> Result<()> {
        if bytes > self.max_work_bytes {
            return Err(ServingError::too_large(
                field,
                format!(
                    "{bytes} bytes of text to read in one call, at most {} (max_work_bytes)",
                    self.max_work_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Checked sampling parameters (the seed drawn at random when none is given).
    pub fn generate_params(&self, o: &GenerateOptions) -> Result<GenerateParams> {
        if o.max_new_tokens > self.max_new_tokens {
            return Err(ServingError::invalid(
                "max_new_tokens",
                format!("at most {}", self.max_new_tokens),
            ));
        }
        if !(o.temperature.is_finite() && (0.0..=self.max_temperature).contains(&o.temperature)) {
            return Err(ServingError::invalid(
                "temperature",
                format!("must be in [0, {}]", self.max_temperature),
            ));
        }
        let top_p = if o.top_p == 0.0 { 1.0 } else { o.top_p };
        if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(ServingError::invalid("top_p", "must be in (0, 1]"));
        }
        if o.stop.len() > self.max_stop_strings {
            return Err(ServingError::invalid(
                "stop",
                format!("at most {} strings", self.max_stop_strings),
            ));
        }
        if o.stop.iter().any(|s| s.is_empty()) {
            return Err(ServingError::invalid("stop", "strings must not be empty"));
        }
        // A stop string is matched against the generated text, which is at most a few KB.
        if let Some((i, s)) = o
            .stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            return Err(ServingError::invalid(
                &format!("stop[{i}]"),
                format!("{} bytes, at most {MAX_STOP_BYTES}", s.len()),
            ));
        }
        let max_new_tokens = if o.max_new_tokens == 0 {
            self.default_new_tokens
        } else {
            o.max_new_tokens
        };
        Ok(GenerateParams {
            max_new_tokens: max_new_tokens as usize,
            temperature: o.temperature,
            top_p,
            seed: o.seed.unwrap_or_else(rand::random),
            stop: o.stop.clone(),
            ..GenerateParams::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn messages_name_the_field_and_limits_are_resource_exhausted() {
        let l = RequestLimits::default();
        let e = l.check_text_input("inputs[2].", "  ", 0).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.message, "inputs[2].input: must not be empty");
        let e = l.check_text_input("", "x", l.max_input_bytes).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        assert!(e.message.starts_with("input: more than"), "{e}");
        let e = l.check_score_input("", "x", &[]).unwrap_err();
        assert!(e.message.starts_with("choices:"), "{e}");
        let many = vec!["c".to_string(); l.max_choices + 1];
        assert!(l.check_score_input("", "x", &many).is_err());
        assert!(l.check_score_input("", "x", &many[..2]).is_ok());
    }

    #[test]
    fn generate_options_become_checked_params() {
        let l = RequestLimits::default();
        let p = l.generate_params(&GenerateOptions::default()).unwrap();
        assert_eq!(p.max_new_tokens, l.default_new_tokens as usize);
        assert_eq!(p.top_p, 1.0);
        let seeded = GenerateOptions {
            seed: Some(7),
            max_new_tokens: 3,
            ..Default::default()
        };
        let p = l.generate_params(&seeded).unwrap();
        assert_eq!((p.seed, p.max_new_tokens), (7, 3));
        for (bad, field) in [
            (
                GenerateOptions {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerateOptions {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerateOptions {
                    max_new_tokens: l.max_new_tokens + 1,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                GenerateOptions {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
            (
                GenerateOptions {
                    stop: vec!["ok".into(), "x".repeat(1 << 20)],
                    ..Default::default()
                },
                "stop[1]",
            ),
        ] {
            let e = l.generate_params(&bad).unwrap_err();
            assert!(e.message.starts_with(field), "{field}: {e}");
        }
    }

    #[test]
    fn expert_ids_no_expert_could_have_are_invalid_by_their_field() {
        assert!(check_expert_id("expert_id", "org/task").is_ok());
        for bad in ["x".repeat(200), "a b".into(), "a//b".into(), "q/".into()] {
            let e = check_expert_id("expert_ids[1]", &bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad:?}: {e}");
            assert!(e.message.starts_with("expert_ids[1]: "), "{bad:?}: {e}");
            assert!(e.message.len() < 300, "{bad:?}: {e}");
        }
    }
}
