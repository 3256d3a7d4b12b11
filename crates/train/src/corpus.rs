//! From text to tokens: training a byte-level BPE tokenizer (the `tokenizers` crate's
//! trainer) and tokenizing text / JSONL (`{"text": ...}`) corpora into train and validation
//! shards.

use crate::data::write_shard;
use anyhow::{anyhow, bail, Context, Result};
use camelid_model::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

/// Marks document ends in prepared data; the tokenizer's only special token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Documents of a corpus file: one per JSONL line's `"text"`, or the whole text file.
pub fn documents(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let t = v
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| anyhow!("{}:{}: no \"text\" string", path.display(), i + 1))?;
            docs.push(t.to_string());
        }
        Ok(docs)
    } else {
        Ok(vec![text])
    }
}

fn check_not_empty(files: &[PathBuf]) -> Result<()> {
    if files.is_empty() {
        bail!("no corpus files given");
    }
    let bytes: u64 = files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .map(|m| m.len())
                .with_context(|| format!("cannot read {}", f.display()))
        })
        .sum::<Result<u64>>()?;
    if bytes == 0 {
        bail!("empty corpus: the input files hold no text");
    }
    Ok(())
}

/// Trains a byte-level BPE tokenizer of at most `vocab` tokens (256 byte tokens, merges and
/// `<|endoftext|>`) on `files`, and writes `out_dir/tokenizer.json`. Returns the vocabulary size.
pub fn train_tokenizer(files: &[PathBuf], vocab: usize, out_dir: &Path) -> Result<usize> {
    check_not_empty(files)?;
    if vocab < 257 {
        bail!("--vocab {vocab} is too small: a byte-level BPE needs 256 byte tokens plus {END_OF_TEXT}");
    }
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| anyhow!("cannot build tokenizer: {e}"))?;
    let mut texts = Vec::new();
    for f in files {
        texts.extend(documents(f)?);
    }
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let path = out_dir.join("tokenizer.json");
    tok.save(&path, false)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    let config =
        serde_json::json!({ "eos_token": END_OF_TEXT, "bos_token": null, "add_bos_token": false });
    std::fs::write(out_dir.join("tokenizer_config.json"), config.to_string())?;
    Ok(tok.get_vocab_size(true))
}

#[derive(Debug, Clone)]
pub struct Prepared {
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub vocab: usize,
    pub width: usize,
}

/// Tokenizes `files` with `tokenizer` (a tokenizer.json, or a directory holding one),
/// appending `<|endoftext|>` after each document when the vocabulary has it, and writes
/// `out/train.bin` and `out/val.bin` (the last `val_fraction` of the tokens) with
/// `width`-byte tokens (2 or 4; `None`: 2 when the vocabulary fits).
/// `progress(done, total)` is called after each document.
pub fn prepare(
    tokenizer: &Path,
    files: &[PathBuf],
    out: &Path,
    val_fraction: f64,
    width: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Prepared> {
    check_not_empty(files)?;
    if !(0.0..1.0).contains(&val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {val_fraction}");
    }
    let tok_path = if tokenizer.is_dir() {
        tokenizer.join("tokenizer.json")
    } else {
        tokenizer.to_path_buf()
    };
    let tok = Tokenizer::from_hf_file(&tok_path)?;
    let vocab = tok.vocab_size();
    let width = match width {
        Some(2) if vocab > 65536 => {
            bail!("the vocabulary of {vocab} tokens is larger than u16 tokens can hold; use --u32")
        }
        Some(w) => w,
        None if vocab > 65536 => 4,
        None => 2,
    };
    let eos = tok.token_to_id(END_OF_TEXT);
    let mut docs = Vec::new();
    for f in files {
        docs.extend(documents(f)?);
    }
    let mut tokens: Vec<u32> = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        tokens.extend(tok.encode(d, false)?);
        if let Some(e) = eos {
            tokens.push(e);
        }
        progress(i + 1, docs.len());
    }
    if tokens.iter().all(|&t| Some(t) == eos) {
        bail!("empty corpus: no tokens in the input files");
    }
    let split = tokens.len() - (tokens.len() as f64 * val_fraction).round() as usize;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_shard(&out.join("train.bin"), &tokens[..split], width, vocab)?;
    write_shard(&out.join("val.bin"), &tokens[split..], width, vocab)?;
    std::fs::copy(&tok_path, out.join("tokenizer.json"))?;
    Ok(Prepared {
        train_tokens: split,
        val_tokens: tokens.len() - split,
        vocab,
        width,
    })
}
