//! Tokenizers: HF `tokenizer.json`, SentencePiece `tokenizer.model`, GGUF-embedded vocabularies.
//!
//! Everything ends up as a `tokenizers::Tokenizer` pipeline. For SentencePiece and GGUF
//! vocabularies camelid builds that pipeline itself, following llama.cpp's tokenizer
//! (src/llama-vocab.cpp) so that the ids match llama.cpp's exactly:
//!
//! * special tokens are split out of the text first, longest first; control and unknown tokens
//!   only when special tokens are parsed, user-defined tokens always;
//! * SentencePiece vocabularies: `▁` for spaces, one `▁` prepended to every text fragment
//!   (`add_space_prefix`), pieces merged by score, unknown characters as `<0xXX>` bytes;
//! * byte-level BPE vocabularies: the pre-tokenizer regexes of `tokenizer.ggml.pre`, then the
//!   vocabulary's merges.
//!
//! Decoding follows `tokenizers` (as transformers does): SentencePiece output loses the one
//! space the prefix added; llama.cpp's optional `clean_spaces` post-pass is not applied.

mod gguf;
mod pretokenize;
mod sentencepiece;
mod vocab;

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use vocab::{partition, Fragment, SpecialPiece};

/// A tokenizer plus the model's special-token conventions.
pub struct Tokenizer {
    /// The `tokenizers` pipeline. For SentencePiece/GGUF vocabularies it has
    /// `encode_special_tokens` set: camelid splits special tokens out itself.
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    /// End-of-generation ids; the first one is the EOS token proper.
    pub eos_ids: Vec<u32>,
    /// Whether `encode(.., add_special = true)` starts with `bos_id`.
    pub add_bos: bool,
    /// The file the tokenizer came from, for error messages.
    source: PathBuf,
    /// One past the largest valid id.
    n_ids: u32,
    kind: Kind,
}

enum Kind {
    /// A `tokenizer.json`: its own added tokens and post-processor.
    Hf {
        /// A copy that treats special-token text as plain text (for `encode_plain`).
        plain: Box<OnceLock<tokenizers::Tokenizer>>,
        /// Whether the post-processor puts `bos_id` first by itself.
        post_adds_bos: bool,
    },
    /// A llama.cpp-style vocabulary: camelid splits out these tokens (longest first).
    Llama { specials: Vec<SpecialPiece> },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// Token texts commonly used for BOS / EOS in `tokenizer.json` files, in order of preference.
const HF_BOS_TEXTS: &[&str] = &["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"];
const HF_EOS_TEXTS: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<eos>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
];

fn max_id(tok: &tokenizers::Tokenizer) -> u32 {
    tok.get_vocab(true)
        .values()
        .copied()
        .max()
        .map_or(0, |m| m.saturating_add(1))
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::tokenizer(path, format!("cannot parse: {e}")))?;
        // Some files carry a training-time truncation/padding setting; a prompt must never be
        // cut or padded silently.
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::tokenizer(path, e.to_string()))?;
        inner.with_padding(None);
        // Best guesses; the loader overrides them from tokenizer_config.json.
        let bos_id = HF_BOS_TEXTS.iter().find_map(|t| inner.token_to_id(t));
        let eos_ids: Vec<u32> = HF_EOS_TEXTS
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .take(1)
            .collect();
        let n_ids = max_id(&inner);
        let mut tok = Self {
            inner,
            bos_id,
            eos_ids,
            add_bos: false,
            source: path.to_path_buf(),
            n_ids,
            kind: Kind::Hf {
                plain: Box::new(OnceLock::new()),
                post_adds_bos: false,
            },
        };
        tok.refresh_post_adds_bos();
        // By default, BOS is added exactly when the file's own post-processor adds it.
        if let Kind::Hf { post_adds_bos, .. } = tok.kind {
            tok.add_bos = post_adds_bos;
        }
        Ok(tok)
    }

    /// Loads a SentencePiece `tokenizer.model` (LLaMA-1/2 style, BPE with byte fallback).
    pub fn from_sentencepiece_file(path: &Path) -> Result<Self> {
        let sp = sentencepiece::read(path)?;
        Self::from_llama_vocab(sp.vocab, path)
    }

    /// Builds the tokenizer llama.cpp would use for a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf_metadata(
        meta: &HashMap<String, gguf_file::Value>,
        path: &Path,
    ) -> Result<Self> {
        let v = gguf::read(meta, path)?;
        Self::from_llama_vocab(v, path)
    }

    fn from_llama_vocab(v: vocab::LlamaVocab, path: &Path) -> Result<Self> {
        let built = v.build(path)?;
        Ok(Self {
            inner: built.inner,
            bos_id: built.bos,
            eos_ids: built.eos_ids,
            add_bos: built.add_bos,
            source: path.to_path_buf(),
            n_ids: u32::try_from(built.n_tokens).unwrap_or(u32::MAX),
            kind: Kind::Llama {
                specials: built.specials,
            },
        })
    }

    fn refresh_post_adds_bos(&mut self) {
        let bos = self.bos_id;
        if let Kind::Hf { post_adds_bos, .. } = &mut self.kind {
            *post_adds_bos = match bos {
                None => false,
                Some(b) => {
                    let with = self.inner.encode("a", true).ok();
                    let without = self.inner.encode("a", false).ok();
                    let first = |e: &Option<tokenizers::Encoding>| {
                        e.as_ref().and_then(|e| e.get_ids().first().copied())
                    };
                    first(&with) == Some(b) && first(&without) != Some(b)
                }
            };
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::tokenizer(&self.source, e.to_string())
    }

    /// Encodes `text`. Special-token text in it (e.g. `<|im_start|>`) becomes the special
    /// token. With `add_special`, BOS is prepended when `add_bos` (for `tokenizer.json` files,
    /// the file's post-processor runs too, and BOS is not doubled when it adds one itself).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Hf { post_adds_bos, .. } => {
                let enc = self
                    .inner
                    .encode(text, add_special)
                    .map_err(|e| self.err(e))?;
                let mut ids = enc.get_ids().to_vec();
                if add_special && self.add_bos && !post_adds_bos {
                    if let Some(b) = self.bos_id {
                        ids.insert(0, b);
                    }
                }
                Ok(ids)
            }
            Kind::Llama { specials } => {
                let mut ids = Vec::new();
                if add_special && self.add_bos {
                    if let Some(b) = self.bos_id {
                        ids.push(b);
                    }
                }
                self.encode_llama(text, specials, true, &mut ids)?;
                Ok(ids)
            }
        }
    }

    /// Encodes `text` with no BOS and without parsing special-token text (it is tokenized as
    /// ordinary text). This is llama.cpp's `tokenize(text, add_special=false,
    /// parse_special=false)`. User-defined added tokens are still recognised, as in llama.cpp
    /// and `tokenizers`.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Hf { plain, .. } => {
                let tok = plain.get_or_init(|| {
                    let mut t = self.inner.clone();
                    t.set_encode_special_tokens(true);
                    t
                });
                let enc = tok.encode(text, false).map_err(|e| self.err(e))?;
                Ok(enc.get_ids().to_vec())
            }
            Kind::Llama { specials } => {
                let mut ids = Vec::new();
                self.encode_llama(text, specials, false, &mut ids)?;
                Ok(ids)
            }
        }
    }

    fn encode_llama(
        &self,
        text: &str,
        specials: &[SpecialPiece],
        parse_special: bool,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        for frag in partition(text, specials, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(s) => {
                    let enc = self.inner.encode(s, false).map_err(|e| self.err(e))?;
                    out.extend_from_slice(enc.get_ids());
                }
            }
        }
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            if id >= self.n_ids || self.inner.id_to_token(id).is_none() {
                return Err(ModelError::Input(format!(
                    "token id {id} is not in the vocabulary of {} ({} ids)",
                    self.source.display(),
                    self.n_ids
                )));
            }
        }
        Ok(())
    }

    /// Decodes ids to text. `skip_special` leaves out control tokens (BOS, EOS, `<|im_end|>`,
    /// ...). Invalid UTF-8 (e.g. an incomplete multi-byte character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.decode_unchecked(ids, skip_special)
    }

    fn decode_unchecked(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token's text as stored in the vocabulary (e.g. `▁Hello`, `Ġworld`, `<0x0A>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Hf { .. } => self.inner.get_vocab_size(true).max(self.n_ids as usize),
            Kind::Llama { .. } => self.n_ids as usize,
        }
    }

    /// Overrides BOS/EOS/add_bos (from tokenizer_config.json / generation_config.json).
    pub fn set_special(&mut self, bos: Option<u32>, eos: Vec<u32>, add_bos: bool) {
        self.bos_id = bos;
        self.eos_ids = eos;
        self.add_bos = add_bos;
        self.refresh_post_adds_bos();
    }

    /// Whether `id` is a special (control) token, which `decode(.., true)` leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }
}

/// Turns a stream of token ids into text deltas that are always complete UTF-8 characters.
///
/// This is transformers' incremental detokenization (the prefix/read offsets of TGI and vLLM):
/// each step decodes a short window of recent ids twice, with and without the new ones, and
/// emits the difference once it does not end in an incomplete character (U+FFFD). Decoding a
/// window rather than single ids keeps SentencePiece's leading-space rule right (only the very
/// first token of the text loses its space). Concatenating every delta (and `flush`) gives
/// `decode(all ids, skip_special)`.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl DecodeStream {
    /// A stream that leaves out special tokens (as `decode(.., true)`), like the defaults of
    /// vLLM and TGI.
    pub fn new() -> Self {
        Self::with_skip_special(true)
    }

    pub fn with_skip_special(skip_special: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    /// Adds one id; returns the new text, if any is complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        self.step(tokenizer, false)
    }

    /// Returns whatever text is still held back (possibly ending in U+FFFD when the ids end
    /// in the middle of a character).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        if self.read_offset >= self.ids.len() {
            return Ok(None);
        }
        self.step(tokenizer, true)
    }

    fn step(&mut self, tokenizer: &Tokenizer, force: bool) -> Result<Option<String>> {
        let skip = self.skip_special;
        let prefix =
            tokenizer.decode_unchecked(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode_unchecked(&self.ids[self.prefix_offset..], skip)?;
        if full.len() <= prefix.len() || (!force && full.ends_with('\u{FFFD}')) {
            if force {
                self.advance();
            }
            return Ok(None);
        }
        let delta = match full.strip_prefix(prefix.as_str()) {
            Some(d) => d.to_string(),
            None => {
                // Not expected with these decoders; emit what differs after the common part.
                let common = full
                    .char_indices()
                    .zip(prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                full[common..].to_string()
            }
        };
        self.advance();
        Ok(if delta.is_empty() { None } else { Some(delta) })
    }

    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Forget what no window will look at again.
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

impl Default for DecodeStream {
    fn default() -> Self {
        Self::new()
    }
}

/// A SentencePiece `tokenizer.model`'s pieces as GGUF stores them (`tokenizer.ggml.tokens`,
/// `scores`, `token_type` with SentencePiece's type codes, which are GGUF's) and the special ids
/// its trainer spec names. Used to write the vocabulary into GGUF files.
pub struct SentencePiecePieces {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

/// Reads a SentencePiece BPE `tokenizer.model` (LLaMA-1/2 style).
pub fn sentencepiece_pieces(path: &Path) -> Result<SentencePiecePieces> {
    use vocab::TokType;
    let v = sentencepiece::read(path)?.vocab;
    Ok(SentencePiecePieces {
        types: v
            .types
            .iter()
            .map(|t| match t {
                TokType::Undefined => 0,
                TokType::Normal => 1,
                TokType::Unknown => 2,
                TokType::Control => 3,
                TokType::UserDefined => 4,
                TokType::Unused => 5,
                TokType::Byte => 6,
            })
            .collect(),
        tokens: v.tokens,
        scores: v.scores,
        bos: v.bos,
        eos: v.eos,
        unk: v.unk,
        pad: v.pad,
    })
}
