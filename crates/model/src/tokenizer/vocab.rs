//! llama.cpp-style vocabularies (GGUF-embedded or SentencePiece) turned into `tokenizers`
//! pipelines.
//!
//! * SPM ("llama"): a BPE with byte fallback whose merges are derived from the vocabulary and
//!   ranked by the merged piece's score (transformers' `SentencePieceExtractor`). That is the
//!   same algorithm as llama.cpp's `llm_tokenizer_spm`: repeatedly merge the adjacent pair whose
//!   concatenation is the best-scoring piece.
//! * BPE ("gpt2"): byte-level BPE with the vocabulary's merges and the pre-tokenizer regexes of
//!   `tokenizer.ggml.pre`.
//! * WPM ("bert"): WordPiece with BERT's normalizer and pre-tokenizer.
//!
//! Control/unknown tokens become special added tokens; user-defined ones plain added tokens.
//! Splitting the text around them is done by camelid itself (see `partition`), in llama.cpp's
//! order (longest token first), so the `tokenizers` pipeline only ever sees plain text.

use super::pretokenize;
use crate::error::{ModelError, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// llama.cpp's token types (`tokenizer.ggml.token_type`, SentencePiece piece types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokType {
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

pub(crate) enum VocabModel {
    /// SentencePiece-style ("llama").
    Spm { add_space_prefix: bool },
    /// Byte-level BPE ("gpt2"): merges as "left right" strings, and the pre-tokenizer name.
    Bpe { merges: Vec<String>, pre: String },
    /// WordPiece ("bert"), llama.cpp's conversion: word-initial pieces start with "▁",
    /// continuation pieces carry no "##".
    Wpm {
        lowercase: bool,
        strip_accents: bool,
    },
}

/// A vocabulary as llama.cpp describes it.
pub(crate) struct LlamaVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<TokType>,
    pub model: VocabModel,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Further end-of-generation ids named by the file (EOT, EOM).
    pub extra_eos: Vec<u32>,
    pub unk: Option<u32>,
    #[allow(dead_code)]
    pub pad: Option<u32>,
    pub add_bos: bool,
}

/// A token that is split out of the text before tokenization.
#[derive(Debug, Clone)]
pub(crate) struct SpecialPiece {
    pub text: String,
    pub id: u32,
    /// User-defined tokens are split out even when special tokens are not parsed.
    pub always: bool,
}

/// The pieces of a llama.cpp-style tokenizer, ready for `Tokenizer`.
pub(crate) struct Built {
    pub inner: tokenizers::Tokenizer,
    pub specials: Vec<SpecialPiece>,
    pub n_tokens: usize,
    pub bos: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub add_bos: bool,
}

/// Token texts that llama.cpp treats as end-of-generation (and as control tokens).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
    "<eos>",
    "<turn|>",
];

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::tokenizer(path, e.to_string())
}

impl LlamaVocab {
    pub fn build(mut self, path: &Path) -> Result<Built> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(ModelError::tokenizer(path, "the vocabulary is empty"));
        }
        if self.types.len() < n {
            self.types.resize(n, TokType::Normal);
        }
        if self.scores.len() < n {
            self.scores.resize(n, 0.0);
        }
        let valid = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        self.bos = valid(self.bos);
        self.eos = valid(self.eos);
        self.unk = valid(self.unk);

        // End-of-generation tokens: the EOS first (the loader uses eos_ids[0] as "the" EOS),
        // then those the file names, then llama.cpp's by-name guesses. llama.cpp also makes
        // the guessed ones control tokens.
        let mut eos_ids: Vec<u32> = Vec::new();
        let push = |id: u32, v: &mut Vec<u32>| {
            if !v.contains(&id) {
                v.push(id)
            }
        };
        if let Some(e) = self.eos {
            push(e, &mut eos_ids);
        }
        for &e in &self.extra_eos {
            if (e as usize) < n {
                push(e, &mut eos_ids);
            }
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t.as_str()) {
                push(i as u32, &mut eos_ids);
                if self.types[i] != TokType::Control {
                    self.types[i] = TokType::Control;
                }
            }
        }

        let inner = match &self.model {
            VocabModel::Spm { add_space_prefix } => self.build_spm(*add_space_prefix, path)?,
            VocabModel::Bpe { merges, pre } => self.build_bpe(merges, pre, path)?,
            VocabModel::Wpm {
                lowercase,
                strip_accents,
            } => self.build_wpm(*lowercase, *strip_accents, path)?,
        };
        let mut inner = inner;

        // Added tokens: control/unknown are special (skipped by decode(skip_special)),
        // user-defined are not.
        let mut special_tokens = Vec::new();
        let mut plain_tokens = Vec::new();
        let mut specials = Vec::new();
        let mut seen = HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let kind = self.types[i];
            let (special, always) = match kind {
                TokType::Control | TokType::Unknown => (true, false),
                TokType::UserDefined => (false, true),
                _ => continue,
            };
            if !seen.insert(t.as_str()) {
                continue;
            }
            let added = AddedToken::from(t.clone(), special).normalized(false);
            if special {
                special_tokens.push(added);
            } else {
                plain_tokens.push(added);
            }
            specials.push(SpecialPiece {
                text: t.clone(),
                id: i as u32,
                always,
            });
        }
        if !special_tokens.is_empty() {
            inner
                .add_special_tokens(special_tokens.clone())
                .map_err(|e| tok_err(path, e))?;
        }
        if !plain_tokens.is_empty() {
            inner
                .add_tokens(plain_tokens.clone())
                .map_err(|e| tok_err(path, e))?;
        }
        // camelid splits special tokens itself (`partition`), so the pipeline must treat the
        // text it is given as plain text.
        inner.set_encode_special_tokens(true);
        // llama.cpp: longest first (a stable sort keeps id order among equal lengths).
        specials.sort_by_key(|s| std::cmp::Reverse(s.text.len()));

        Ok(Built {
            inner,
            specials,
            n_tokens: n,
            bos: self.bos,
            eos_ids,
            add_bos: self.add_bos,
        })
    }

    fn vocab_map(&self) -> Vocab {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }

    fn build_spm(&self, add_space_prefix: bool, path: &Path) -> Result<tokenizers::Tokenizer> {
        let vocab = self.vocab_map();
        // Every split of every piece into two pieces, ranked by the merged piece's score:
        // best first; ties by the merged piece's id, then by the parts' ids.
        let mut merges: Vec<(f32, u32, u32, u32, usize)> = Vec::new();
        for (i, piece) in self.tokens.iter().enumerate() {
            // The id the vocabulary maps this text to (duplicates: the last one wins).
            if vocab.get(piece) != Some(&(i as u32)) {
                continue;
            }
            for (k, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(k);
                if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                    merges.push((self.scores[i], i as u32, li, ri, k));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(_, i, _, _, k)| {
                let piece = &self.tokens[i as usize];
                let (l, r) = piece.split_at(k);
                (l.to_string(), r.to_string())
            })
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = builder.build().map_err(|e| tok_err(path, e))?;

        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            normalizers.push(Prepend::new("▁".into()).into());
        }
        normalizers.push(Replace::new(" ", "▁").map_err(|e| tok_err(path, e))?.into());
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("▁", " ").map_err(|e| tok_err(path, e))?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_normalizer(Some(NormalizerSequence::new(normalizers)))
            .map_err(|e| tok_err(path, e))?;
        tok.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tok)
    }

    fn build_bpe(
        &self,
        merges: &[String],
        pre: &str,
        path: &Path,
    ) -> Result<tokenizers::Tokenizer> {
        // Gemma 4: BPE over raw UTF-8 with "▁" for spaces and <0xXX> byte fallback, the text
        // split only into runs of newlines and runs of anything else.
        let spm_style = pre == "gemma4";
        let pre_tok = if spm_style {
            Some(pretokenize::PreTokenizer {
                regexes: &["[^\n]+|[\n]+"],
                // llama.cpp takes a newline run that is a token as is; other runs are merged,
                // and merging a run that is a token gives that token anyway.
                ignore_merges: true,
                add_bos: Some(true),
            })
        } else {
            pretokenize::lookup(pre)
        };
        let pre_tok = pre_tok.ok_or_else(|| {
            ModelError::tokenizer(
                path,
                format!("unsupported pre-tokenizer type \"{pre}\" (tokenizer.ggml.pre)"),
            )
        })?;
        let vocab = self.vocab_map();
        // llama.cpp keeps the first rank of a repeated merge; merges whose parts or result are
        // not tokens can never produce a token and are dropped.
        let mut seen = HashSet::new();
        let mut pairs = Vec::with_capacity(merges.len());
        for m in merges {
            // llama.cpp splits at the first space after the first byte.
            let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (l, r) = (&m[..pos], &m[pos + 1..]);
            if !vocab.contains_key(l) || !vocab.contains_key(r) {
                continue;
            }
            if !vocab.contains_key(&format!("{l}{r}")) {
                continue;
            }
            if seen.insert((l, r)) {
                pairs.push((l.to_string(), r.to_string()));
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .ignore_merges(pre_tok.ignore_merges)
            .byte_fallback(spm_style)
            .build()
            .map_err(|e| tok_err(path, e))?;

        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for r in pre_tok.regexes {
            let split = Split::new(
                SplitPattern::Regex((*r).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(path, format!("pre-tokenizer regex {r:?}: {e}")))?;
            steps.push(split.into());
        }
        let mut tok = tokenizers::Tokenizer::new(bpe);
        if spm_style {
            tok.with_normalizer(Some(Replace::new(" ", "▁").map_err(|e| tok_err(path, e))?))
                .map_err(|e| tok_err(path, e))?;
            tok.with_pre_tokenizer(Some(PreSequence::new(steps)));
            let decoders: Vec<DecoderWrapper> = vec![
                Replace::new("▁", " ").map_err(|e| tok_err(path, e))?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            tok.with_decoder(Some(DecoderSequence::new(decoders)));
        } else {
            steps.push(ByteLevel::new(false, false, false).into());
            tok.with_pre_tokenizer(Some(PreSequence::new(steps)));
            tok.with_decoder(Some(ByteLevel::new(false, false, false)));
        }
        Ok(tok)
    }

    fn build_wpm(
        &self,
        lowercase: bool,
        strip_accents: bool,
        path: &Path,
    ) -> Result<tokenizers::Tokenizer> {
        // Back to HF's WordPiece convention: "▁word" → "word", "piece" → "##piece".
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let text = match self.types[i] {
                TokType::Normal => match t.strip_prefix('▁') {
                    Some(rest) if !rest.is_empty() => rest.to_string(),
                    _ => format!("##{t}"),
                },
                _ => t.clone(),
            };
            vocab.entry(text).or_insert(i as u32);
        }
        let vocab: Vocab = vocab.into_iter().collect();
        let unk = self
            .unk
            .map(|u| self.tokens[u as usize].clone())
            .unwrap_or_else(|| "[UNK]".to_string());
        let wp = WordPiece::builder()
            .vocab(vocab)
            .unk_token(unk)
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(usize::MAX)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let mut tok = tokenizers::Tokenizer::new(wp);
        tok.with_normalizer(Some(BertNormalizer::new(
            true,
            true,
            Some(strip_accents),
            lowercase,
        )))
        .map_err(|e| tok_err(path, e))?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_decoder(Some(WordPieceDecoder::new("##".into(), false)));
        Ok(tok)
    }
}

/// A piece of text after splitting out special tokens.
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// llama.cpp's `tokenizer_st_partition`: for each special token, longest first, split every
/// remaining text fragment at each of its occurrences. Control and unknown tokens are only
/// split out when `parse_special`.
pub(crate) fn partition<'a>(
    text: &'a str,
    specials: &[SpecialPiece],
    parse_special: bool,
) -> Vec<Fragment<'a>> {
    // (start, end) byte ranges of text, or a token id.
    enum F {
        Text(usize, usize),
        Token(u32),
    }
    if text.is_empty() {
        return Vec::new();
    }
    let mut frags = vec![F::Text(0, text.len())];
    for sp in specials {
        if !(parse_special || sp.always) || sp.text.is_empty() {
            continue;
        }
        if !text.contains(sp.text.as_str()) {
            continue;
        }
        let mut out = Vec::with_capacity(frags.len() + 2);
        for f in frags {
            match f {
                F::Token(id) => out.push(F::Token(id)),
                F::Text(mut start, end) => {
                    while let Some(pos) = text[start..end].find(sp.text.as_str()) {
                        let m = start + pos;
                        if m > start {
                            out.push(F::Text(start, m));
                        }
                        out.push(F::Token(sp.id));
                        start = m + sp.text.len();
                    }
                    if start < end {
                        out.push(F::Text(start, end));
                    }
                }
            }
        }
        frags = out;
    }
    frags
        .into_iter()
        .map(|f| match f {
            F::Text(s, e) => Fragment::Text(&text[s..e]),
            F::Token(id) => Fragment::Token(id),
        })
        .collect()
}
