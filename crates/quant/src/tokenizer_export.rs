//! An HF directory's tokenizer as llama.cpp's `tokenizer.*` GGUF keys, written as
//! `convert_hf_to_gguf.py` writes them for byte-level BPE tokenizers (`_set_vocab_gpt2`):
//! tokens by id (gaps padded `[PAD{i}]`, type UNUSED), token types (NORMAL, CONTROL for special
//! added tokens, USER_DEFINED for the other added tokens), merges, the pre-tokenizer name, the
//! special ids from `tokenizer_config.json` / `config.json`, and the chat template; and
//! SentencePiece `tokenizer.model` files as its `_set_vocab_sentencepiece` writes them.

use camelid_model::ModelError;
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::path::Path;

type Result<T> = std::result::Result<T, ModelError>;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))
}

/// llama.cpp's pre-tokenizer name for a `tokenizer.json` `pre_tokenizer`, recognized by the
/// split rules it encodes (llama.cpp's converter identifies them by hashing the tokenizer's
/// output on a test text; these are the rules behind the names camelid's families use).
pub fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let text = pre.to_string();
    let has = |s: &str| text.contains(s);
    if has("\"Digits\"") && has("\"individual_digits\":true") && has("\"ByteLevel\"") {
        // SmolLM / StarCoder: digits split one by one, then GPT-2's byte-level regex.
        return Some("smollm");
    }
    if has(r"\\p{N}{1,3}") {
        return Some("llama-bpe");
    }
    if has(r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|") {
        return Some("qwen2");
    }
    if pre.get("type").and_then(Json::as_str) == Some("ByteLevel")
        && pre.get("use_regex").and_then(Json::as_bool) != Some(false)
    {
        return Some("gpt-2");
    }
    None
}

/// The `tokenizer.*` keys for `dir`, or, without a tokenizer, `tokenizer.ggml.model = "none"`
/// (llama.cpp then sizes its vocabulary from `{arch}.vocab_size`).
pub fn from_hf_dir(
    dir: &Path,
    vocab_size: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, Value)>> {
    let s = |v: &str| Value::String(v.to_string());
    let tok_path = dir.join("tokenizer.json");
    // llama.cpp's converter prefers the SentencePiece model when a directory has both.
    let spm = dir.join("tokenizer.model");
    if spm.exists() {
        return sentencepiece(dir, &spm, vocab_size, notes);
    }
    let Some(tok) = read_json(&tok_path)? else {
        notes.push(format!(
            "{}: no tokenizer; the GGUF has no vocabulary (token ids only)",
            dir.display()
        ));
        return Ok(vec![("tokenizer.ggml.model".into(), s("none"))]);
    };
    let model = tok
        .get("model")
        .ok_or_else(|| ModelError::format(&tok_path, "no \"model\""))?;
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("");
    let byte_level = tok.to_string().contains("\"ByteLevel\"");
    if kind != "BPE" || !byte_level {
        return Err(ModelError::tokenizer(
            &tok_path,
            format!(
                "only byte-level BPE tokenizers are written to GGUF (this one is {kind}{})",
                if byte_level { "" } else { " without ByteLevel" }
            ),
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| ModelError::format(&tok_path, "model.vocab is not an object"))?;
    let added: Vec<(usize, String, bool)> = tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some((
                        t.get("id")?.as_u64()? as usize,
                        t.get("content")?.as_str()?.to_string(),
                        t.get("special").and_then(Json::as_bool).unwrap_or(false),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let max_id = vocab
        .values()
        .filter_map(Json::as_u64)
        .map(|v| v as usize)
        .chain(added.iter().map(|a| a.0))
        .max()
        .unwrap_or(0);
    let n = vocab_size.max(max_id + 1);
    if n > vocab_size {
        return Err(ModelError::tokenizer(
            &tok_path,
            format!("token id {max_id} is past the model's vocab_size {vocab_size}"),
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![NORMAL; n];
    for (text, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(text.clone());
        }
    }
    for (id, text, special) in &added {
        tokens[*id] = Some(text.clone());
        types[*id] = if *special { CONTROL } else { USER_DEFINED };
    }
    let mut padded = 0;
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                padded += 1;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    if padded > 0 {
        notes.push(format!(
            "tokenizer: {padded} ids without a token written as [PAD<id>] (unused)"
        ));
    }
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(Json::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Json::String(s) => Some(Value::String(s.clone())),
                    Json::Array(p) if p.len() == 2 => Some(Value::String(format!(
                        "{} {}",
                        p[0].as_str()?,
                        p[1].as_str()?
                    ))),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let pre = match tok.get("pre_tokenizer").and_then(pre_tokenizer_name) {
        Some(p) => p,
        None => {
            notes.push(
                "tokenizer: pre-tokenizer not recognized; written as \"default\" (llama.cpp may split text differently)".into(),
            );
            "default"
        }
    };
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s(pre)),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];

    let lookup = |text: &str| -> Option<u32> {
        vocab
            .get(text)
            .and_then(Json::as_u64)
            .map(|v| v as u32)
            .or_else(|| added.iter().find(|a| a.1 == text).map(|a| a.0 as u32))
    };
    special_keys(dir, &lookup, [None; 4], &mut out)?;
    Ok(out)
}

/// A SentencePiece `tokenizer.model` as `convert_hf_to_gguf.py`'s `_set_vocab_sentencepiece`
/// writes it: model `llama`, pre-tokenizer `default`, the pieces with their scores and types,
/// ids past the pieces up to the model's vocabulary padded `[PAD{i}]` (score -1000, UNUSED),
/// then the special ids, `add_bos_token` / `add_eos_token` and the chat template.
fn sentencepiece(
    dir: &Path,
    path: &Path,
    vocab_size: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, Value)>> {
    let p = camelid_model::tokenizer::sentencepiece_pieces(path)?;
    if p.tokens.len() > vocab_size {
        return Err(ModelError::tokenizer(
            path,
            format!(
                "{} pieces, more than the model's vocab_size {vocab_size}",
                p.tokens.len()
            ),
        ));
    }
    let (mut tokens, mut scores, mut types) = (p.tokens, p.scores, p.types);
    let pieces = tokens.len();
    for i in pieces..vocab_size {
        tokens.push(format!("[PAD{i}]"));
        scores.push(-1000.0);
        types.push(UNUSED);
    }
    if vocab_size > pieces {
        notes.push(format!(
            "tokenizer: ids {pieces}..{vocab_size} have no piece; written as [PAD<id>] (unused)"
        ));
    }
    let lookup = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("default".into()),
        ),
    ];
    let fallback = [p.bos, p.eos, p.unk, p.pad];
    let mut rest = Vec::new();
    special_keys(dir, &lookup, fallback, &mut rest)?;
    out.push((
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    out.push((
        "tokenizer.ggml.scores".to_string(),
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    ));
    out.push((
        "tokenizer.ggml.token_type".to_string(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    out.extend(rest);
    Ok(out)
}

/// The special ids (`tokenizer_config.json`'s token texts, else `config.json`'s ids, else
/// `fallback` in the order bos, eos, unk, pad), the `add_*_token` flags and the chat template.
fn special_keys(
    dir: &Path,
    lookup: &dyn Fn(&str) -> Option<u32>,
    fallback: [Option<u32>; 4],
    out: &mut Vec<(String, Value)>,
) -> Result<()> {
    let tc = read_json(&dir.join("tokenizer_config.json"))?;
    let cfg = read_json(&dir.join("config.json"))?;
    for ((field, key), fallback) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
    ]
    .into_iter()
    .zip(fallback)
    {
        let text = tc
            .as_ref()
            .and_then(|t| t.get(format!("{field}_token")))
            .and_then(|v| match v {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            });
        let id = text
            .as_deref()
            .and_then(lookup)
            .or_else(|| {
                cfg.as_ref()
                    .and_then(|c| c.get(format!("{field}_token_id")))
                    .and_then(Json::as_u64)
                    .map(|v| v as u32)
            })
            .or(fallback);
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    for flag in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = tc
            .as_ref()
            .and_then(|t| t.get(flag))
            .and_then(Json::as_bool)
        {
            out.push((format!("tokenizer.ggml.{flag}"), Value::Bool(b)));
        }
    }
    let template = tc
        .as_ref()
        .and_then(|t| t.get("chat_template"))
        .and_then(Json::as_str)
        .map(str::to_string);
    let template = match template {
        Some(t) => Some(t),
        None => {
            let p = dir.join("chat_template.jinja");
            if p.exists() {
                Some(std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?)
            } else {
                None
            }
        }
    };
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".to_string(), Value::String(t)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(regex: &str) -> Json {
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]})
    }

    #[test]
    fn pre_tokenizers_by_their_rules() {
        // As the published tokenizer.json files spell them.
        let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        assert_eq!(pre_tokenizer_name(&split(llama3)), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_name(&split(qwen2)), Some("qwen2"));
        let smollm = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]});
        assert_eq!(pre_tokenizer_name(&smollm), Some("smollm"));
        let gpt2 = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&gpt2), Some("gpt-2"));
        assert_eq!(
            pre_tokenizer_name(&serde_json::json!({"type": "Whitespace"})),
            None
        );
    }
}
