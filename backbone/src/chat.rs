//! The backbone's chat template: the Jinja template a model ships in its GGUF metadata
//! (`tokenizer.chat_template`), rendered as Hugging Face renders it (trimmed blocks, Python
//! string methods, `raise_exception`), so that a conversation reaches the model in the
//! format it was tuned on.

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{BackboneError, Result};

/// The GGUF metadata key of the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; an error names what in the template does not parse.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // As transformers' `apply_chat_template`.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| BackboneError::Gguf(format!("{CHAT_TEMPLATE_KEY}: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The conversation as the model reads it, ending with the assistant's turn opened.
    /// INVALID_ARGUMENT when the template refuses the messages (`raise_exception`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| BackboneError::InvalidInput(format!("chat template: {e}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| BackboneError::InvalidInput(format!("messages: {}", describe(&e))))
    }
}

/// A template error without minijinja's source listing: what the caller can act on.
fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => detail.to_string(),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_as_transformers_does() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let user = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            t.render(&user).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            t.render(&with_system).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_template_that_refuses_the_messages_is_invalid_input() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message \
                      must be the user\\'s') }}{% endif %}{{ messages[0]['content'].strip() }}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", " x ")]).unwrap(), "x");
        let e = t.render(&[ChatMessage::new("assistant", "x")]).unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
        assert!(e.to_string().contains("must be the user's"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
