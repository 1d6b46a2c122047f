//! The backbone's tokenizer: built from GGUF metadata (`tokenizer.ggml.*`, a GPT-2 style
//! byte-level BPE) or read from a `tokenizer.json`.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{BackboneError, Result};

/// A thin wrapper over `tokenizers::Tokenizer` that never adds special tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Tokenizer(e.to_string())
}

fn md_strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| BackboneError::Tokenizer(format!("missing metadata key {key}")))?;
    let arr = v.to_vec().map_err(tk_err)?;
    arr.iter()
        .map(|x| x.to_string().cloned().map_err(tk_err))
        .collect()
}

impl TextTokenizer {
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        Self { inner }
    }

    /// Read a Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path)
            .map_err(|e| BackboneError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Build the tokenizer described by the GGUF metadata. Only `tokenizer.ggml.model = gpt2`
    /// (byte-level BPE) is supported. Digits are split one by one, as the `smollm` /
    /// `starcoder` pre-tokenizers of llama.cpp and the original `tokenizer.json` do.
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = ct
            .metadata
            .get("tokenizer.ggml.model")
            .ok_or_else(|| BackboneError::Tokenizer("missing tokenizer.ggml.model".into()))?
            .to_string()
            .map_err(tk_err)?;
        if model != "gpt2" {
            return Err(BackboneError::Tokenizer(format!(
                "unsupported tokenizer.ggml.model {model:?} (expected gpt2)"
            )));
        }
        let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
        let merges = md_strings(ct, "tokenizer.ggml.merges")?;
        let token_types: Vec<i64> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tk_err)?
                .iter()
                .map(|x| match x {
                    Value::I32(i) => *i as i64,
                    Value::U32(i) => *i as i64,
                    Value::I64(i) => *i,
                    Value::U8(i) => *i as i64,
                    Value::I8(i) => *i as i64,
                    _ => 1,
                })
                .collect(),
            None => vec![1; tokens.len()],
        };
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        // Pre-tokenizers that isolate every digit (llama.cpp: `\p{N}` first).
        let split_digits = matches!(
            pre.as_str(),
            "smollm"
                | "starcoder"
                | "refact"
                | "command-r"
                | "codeshell"
                | "exaone"
                | "minerva"
                | ""
        );

        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for m in &merges {
            let mut parts = m.splitn(2, ' ');
            match (parts.next(), parts.next()) {
                (Some(a), Some(b)) => merge_pairs.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(BackboneError::Tokenizer(format!("malformed merge {m:?}")));
                }
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merge_pairs)
            .build()
            .map_err(tk_err)?;
        let mut tok = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        if split_digits {
            tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ]))));
        } else {
            tok.with_pre_tokenizer(Some(byte_level));
        }
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are matched whole, like the original tokenizer does.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(token_types.iter())
            .filter(|(_, ty)| **ty == 3)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        if !specials.is_empty() {
            tok.add_special_tokens(specials).map_err(tk_err)?;
        }
        Ok(Self { inner: tok })
    }

    /// Token ids of `text`, without any special token added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tk_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tk_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
