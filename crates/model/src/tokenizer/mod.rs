//! Tokenizers: HF `tokenizer.json`, SentencePiece `tokenizer.model`, GGUF-embedded vocabularies.
//! (Interface placeholder; implementation in progress.)

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::path::Path;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub add_bos: bool,
}

impl Tokenizer {
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        Err(ModelError::tokenizer(path, "not implemented"))
    }
    pub fn from_sentencepiece_file(path: &Path) -> Result<Self> {
        Err(ModelError::tokenizer(path, "not implemented"))
    }
    pub fn from_gguf_metadata(
        _meta: &HashMap<String, gguf_file::Value>,
        path: &Path,
    ) -> Result<Self> {
        Err(ModelError::tokenizer(path, "not implemented"))
    }
    pub fn encode(&self, _text: &str, _add_special: bool) -> Result<Vec<u32>> {
        Err(ModelError::Input("not implemented".into()))
    }
    pub fn decode(&self, _ids: &[u32], _skip_special: bool) -> Result<String> {
        Err(ModelError::Input("not implemented".into()))
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    pub fn set_special(&mut self, bos: Option<u32>, eos: Vec<u32>, add_bos: bool) {
        self.bos_id = bos;
        self.eos_ids = eos;
        self.add_bos = add_bos;
    }
    pub fn flush_placeholder(&self) {}
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into text deltas that are always whole UTF-8 characters.
pub struct DecodeStream {
    pub ids: Vec<u32>,
}

impl DecodeStream {
    pub fn new() -> Self {
        Self { ids: Vec::new() }
    }
    pub fn push(&mut self, _tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        Ok(None)
    }
}

impl DecodeStream {
    pub fn flush(&mut self, _tokenizer: &Tokenizer) -> Result<Option<String>> {
        Ok(None)
    }
}

impl Default for DecodeStream {
    fn default() -> Self {
        Self::new()
    }
}
