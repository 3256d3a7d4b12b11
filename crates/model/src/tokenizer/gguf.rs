//! llama.cpp vocabularies embedded in GGUF metadata (`tokenizer.ggml.*`).

use super::vocab::{LlamaVocab, TokType, VocabModel};
use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;

type Meta = HashMap<String, Value>;

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        Value::Bool(b) => i64::from(*b),
        _ => return None,
    })
}

fn as_f32(v: &Value) -> Option<f32> {
    match v {
        Value::F32(x) => Some(*x),
        Value::F64(x) => Some(*x as f32),
        other => as_i64(other).map(|x| x as f32),
    }
}

fn get_str<'a>(meta: &'a Meta, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match meta.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(ModelError::tokenizer(
            path,
            format!("{key} should be a string, found {:?}", other.value_type()),
        )),
    }
}

fn get_bool(meta: &Meta, key: &str, path: &Path) -> Result<Option<bool>> {
    match meta.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => as_i64(v).map(|x| Some(x != 0)).ok_or_else(|| {
            ModelError::tokenizer(
                path,
                format!("{key} should be a bool, found {:?}", v.value_type()),
            )
        }),
    }
}

/// A token id key; ids outside the vocabulary are ignored (llama.cpp warns and keeps its
/// default).
fn get_id(meta: &Meta, key: &str, n: usize, path: &Path) -> Result<Option<Option<u32>>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => {
            let x = as_i64(v).ok_or_else(|| {
                ModelError::tokenizer(
                    path,
                    format!("{key} should be an integer, found {:?}", v.value_type()),
                )
            })?;
            Ok(Some(u32::try_from(x).ok().filter(|&i| (i as usize) < n)))
        }
    }
}

fn get_array<'a>(meta: &'a Meta, key: &str, path: &Path) -> Result<Option<&'a Vec<Value>>> {
    match meta.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err(ModelError::tokenizer(
            path,
            format!("{key} should be an array, found {:?}", other.value_type()),
        )),
    }
}

fn strings(arr: &[Value], key: &str, path: &Path) -> Result<Vec<String>> {
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(ModelError::tokenizer(
                path,
                format!(
                    "{key}[{i}] should be a string, found {:?}",
                    other.value_type()
                ),
            )),
        })
        .collect()
}

/// Reads the vocabulary described by `tokenizer.ggml.*`.
pub(crate) fn read(meta: &Meta, path: &Path) -> Result<LlamaVocab> {
    let model = get_str(meta, "tokenizer.ggml.model", path)?
        .ok_or_else(|| ModelError::tokenizer(path, "tokenizer.ggml.model is missing"))?;
    let pre = get_str(meta, "tokenizer.ggml.pre", path)?.unwrap_or("default");

    let tokens_v = get_array(meta, "tokenizer.ggml.tokens", path)?
        .ok_or_else(|| ModelError::tokenizer(path, "tokenizer.ggml.tokens is missing"))?;
    let mut tokens = strings(tokens_v, "tokenizer.ggml.tokens", path)?;
    let n = tokens.len();
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[EMPTY_{i}]");
        }
    }

    let scores = match get_array(meta, "tokenizer.ggml.scores", path)? {
        None => vec![0.0; n],
        Some(a) => {
            if a.len() < n {
                return Err(ModelError::tokenizer(
                    path,
                    format!(
                        "tokenizer.ggml.scores has {} entries for {n} tokens",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .take(n)
                .enumerate()
                .map(|(i, v)| {
                    as_f32(v).ok_or_else(|| {
                        ModelError::tokenizer(
                            path,
                            format!("tokenizer.ggml.scores[{i}] is not a number"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
    };
    let types = match get_array(meta, "tokenizer.ggml.token_type", path)? {
        None => vec![TokType::Normal; n],
        Some(a) => {
            if a.len() < n {
                return Err(ModelError::tokenizer(
                    path,
                    format!(
                        "tokenizer.ggml.token_type has {} entries for {n} tokens",
                        a.len()
                    ),
                ));
            }
            a.iter()
                .take(n)
                .enumerate()
                .map(|(i, v)| {
                    as_i64(v).map(TokType::from_code).ok_or_else(|| {
                        ModelError::tokenizer(
                            path,
                            format!("tokenizer.ggml.token_type[{i}] is not an integer"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
    };

    // Defaults per vocabulary type, as in llama.cpp.
    let (vmodel, mut bos, mut eos, mut unk, mut pad, mut add_bos) = match model {
        "llama" => {
            let add_space_prefix =
                get_bool(meta, "tokenizer.ggml.add_space_prefix", path)?.unwrap_or(true);
            (
                VocabModel::Spm { add_space_prefix },
                Some(1),
                Some(2),
                Some(0),
                None,
                true,
            )
        }
        "gpt2" => {
            let merges_v = get_array(meta, "tokenizer.ggml.merges", path)?.ok_or_else(|| {
                ModelError::tokenizer(path, "tokenizer.ggml.merges is missing")
            })?;
            let merges = strings(merges_v, "tokenizer.ggml.merges", path)?;
            let p = super::pretokenize::lookup(pre).ok_or_else(|| {
                ModelError::tokenizer(
                    path,
                    format!(
                        "unsupported pre-tokenizer type \"{pre}\" (tokenizer.ggml.pre); camelid \
                         knows default, llama3/llama-bpe, qwen2, smollm, starcoder, gpt-2, mpt, \
                         falcon, deepseek, and a few more"
                    ),
                )
            })?;
            // llama.cpp defaults both to 11 (a GPT-2 artefact); camelid leaves them unset
            // unless the file names them.
            (
                VocabModel::Bpe {
                    merges,
                    pre: pre.to_string(),
                },
                None,
                None,
                None,
                None,
                p.add_bos.unwrap_or(false),
            )
        }
        "gemma4" => {
            // SentencePiece-style BPE: "▁" for spaces, raw UTF-8 pieces, <0xXX> byte tokens.
            let merges_v = get_array(meta, "tokenizer.ggml.merges", path)?.ok_or_else(|| {
                ModelError::tokenizer(path, "tokenizer.ggml.merges is missing")
            })?;
            let merges = strings(merges_v, "tokenizer.ggml.merges", path)?;
            (
                VocabModel::Bpe {
                    merges,
                    pre: "gemma4".to_string(),
                },
                None,
                None,
                None,
                None,
                true,
            )
        }
        "bert" => {
            let lowercase =
                get_bool(meta, "tokenizer.ggml.normalizer.lowercase", path)?.unwrap_or(true);
            let strip_accents = get_bool(meta, "tokenizer.ggml.normalizer.strip_accents", path)?
                .unwrap_or(lowercase);
            (
                VocabModel::Wpm {
                    lowercase,
                    strip_accents,
                },
                Some(101),
                None,
                Some(100),
                Some(0),
                true,
            )
        }
        other => {
            return Err(ModelError::tokenizer(
                path,
                format!(
                    "unsupported tokenizer model \"{other}\" (tokenizer.ggml.model); camelid \
                     supports \"llama\" (SentencePiece), \"gpt2\" (byte-level BPE), \"gemma4\" and \"bert\""
                ),
            ))
        }
    };
    // Defaults that do not fit the vocabulary are dropped, as llama.cpp does.
    let fit = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
    bos = fit(bos);
    eos = fit(eos);
    unk = fit(unk);
    pad = fit(pad);
    if let Some(v) = get_id(meta, "tokenizer.ggml.bos_token_id", n, path)? {
        if v.is_some() {
            bos = v;
        }
    }
    if let Some(v) = get_id(meta, "tokenizer.ggml.eos_token_id", n, path)? {
        if v.is_some() {
            eos = v;
        }
    }
    if let Some(v) = get_id(meta, "tokenizer.ggml.unknown_token_id", n, path)? {
        if v.is_some() {
            unk = v;
        }
    }
    if let Some(v) = get_id(meta, "tokenizer.ggml.padding_token_id", n, path)? {
        if v.is_some() {
            pad = v;
        }
    }
    let mut extra_eos = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(Some(id)) = get_id(meta, key, n, path)? {
            extra_eos.push(id);
        }
    }
    if let Some(b) = get_bool(meta, "tokenizer.ggml.add_bos_token", path)? {
        // llama.cpp forces BOS for Gemma 4.
        add_bos = b || model == "gemma4";
    }
    if bos.is_none() {
        add_bos = false;
    }

    Ok(LlamaVocab {
        tokens,
        scores,
        types,
        model: vmodel,
        bos,
        eos,
        extra_eos,
        unk,
        pad,
        add_bos,
    })
}
