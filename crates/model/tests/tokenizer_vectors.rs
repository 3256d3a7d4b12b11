//! Tokenizer tests against llama.cpp's vocabulary vectors (`models/ggml-vocab-*.gguf` with
//! `.inp`/`.out`, as read by llama.cpp's `tests/test-tokenizer-0.cpp`: add_special=false,
//! parse_special=false), LLaMA's SentencePiece `tokenizer.model`, SmolLM2's GGUF vocabulary,
//! a `tokenizer.json`, round trips and streaming detokenization.

mod common;

use camelid_model::tokenizer::{DecodeStream, Tokenizer};
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

fn gguf_metadata(path: &Path) -> std::collections::HashMap<String, gguf_file::Value> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut f)
        .unwrap_or_else(|e| panic!("{}: cannot read GGUF: {e}", path.display()));
    content.metadata
}

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    Tokenizer::from_gguf_metadata(&gguf_metadata(path), path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tokenizer of `ggml-vocab-NAME.gguf`, loaded once per test process.
fn vocab(name: &str) -> &'static Tokenizer {
    static LOADED: OnceLock<Mutex<HashMap<String, &'static Tokenizer>>> = OnceLock::new();
    let map = LOADED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(t) = map.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
        return t;
    }
    let tok: &'static Tokenizer = Box::leak(Box::new(gguf_tokenizer(&common::vocab_gguf(name))));
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.to_string())
        .or_insert(tok)
}

/// The cases of `ggml-vocab-NAME.gguf.inp/.out`, split as test-tokenizer-0.cpp does.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let base = common::vocab_gguf(name);
    let inp_path = base.with_extension("gguf.inp");
    let out_path = base.with_extension("gguf.out");
    let raw = std::fs::read_to_string(&inp_path)
        .unwrap_or_else(|e| panic!("{}: {e}", inp_path.display()));
    let out = std::fs::read_to_string(&out_path)
        .unwrap_or_else(|e| panic!("{}: {e}", out_path.display()));
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].find(sep) {
            Some(i) => {
                inputs.push(raw[pos..pos + i].to_string());
                pos += i + sep.len();
            }
            None => {
                inputs.push(raw[pos..].to_string());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse::<u32>().unwrap_or_else(|e| panic!("{t:?}: {e}")))
                .collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{name}: {} inputs but {} outputs",
        inputs.len(),
        outputs.len()
    );
    assert!(inputs.len() >= 40, "{name}: only {} cases", inputs.len());
    inputs.into_iter().zip(outputs).collect()
}

/// Encodes every case like llama.cpp's test and panics listing every mismatch.
fn check_vectors(tok: &Tokenizer, name: &str) {
    let cases = cases(name);
    let mut failures = Vec::new();
    for (text, expected) in &cases {
        let got = tok
            .encode_plain(text)
            .unwrap_or_else(|e| panic!("{name}: encode {text:?}: {e}"));
        if &got != expected {
            failures.push(format!(
                "  {text:?}\n    expected {expected:?}\n    got      {got:?}"
            ));
        }
    }
    let passed = cases.len() - failures.len();
    eprintln!("{name}: {passed}/{} vectors pass", cases.len());
    assert!(
        failures.is_empty(),
        "{name}: {passed}/{} vectors pass; failures:\n{}",
        cases.len(),
        failures.join("\n")
    );
}

/// decode(encode_plain(text)) gives the text back for every case.
fn check_round_trip(tok: &Tokenizer, name: &str, cases: &[(String, Vec<u32>)]) {
    let mut failures = Vec::new();
    for (text, _) in cases {
        let ids = tok.encode_plain(text).expect("encode");
        let back = tok.decode(&ids, false).expect("decode");
        if &back != text {
            failures.push(format!("  {text:?} -> {ids:?} -> {back:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases do not round-trip:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Vectors and round trip of one vocabulary.
fn check_vocab(name: &str) {
    let tok = vocab(name);
    check_vectors(tok, name);
    check_round_trip(tok, name, &cases(name));
}

#[test]
fn vectors_llama_spm() {
    check_vocab("llama-spm");
}

#[test]
fn vectors_llama_bpe() {
    check_vocab("llama-bpe");
}

#[test]
fn vectors_qwen2() {
    check_vocab("qwen2");
}

#[test]
fn vectors_gpt2() {
    check_vocab("gpt-2");
}

#[test]
fn vectors_falcon() {
    check_vocab("falcon");
}

#[test]
fn vectors_mpt() {
    check_vocab("mpt");
}

#[test]
fn vectors_starcoder() {
    check_vocab("starcoder");
}

#[test]
fn vectors_bert_bge() {
    // WordPiece lowercases and drops accents: no round trip.
    check_vectors(vocab("bert-bge"), "bert-bge");
}

#[test]
fn vectors_phi3() {
    check_vocab("phi-3");
}

#[test]
fn vectors_command_r() {
    check_vocab("command-r");
}

#[test]
fn vectors_deepseek_coder() {
    check_vocab("deepseek-coder");
}

#[test]
fn vectors_deepseek_llm() {
    check_vocab("deepseek-llm");
}

#[test]
fn vectors_refact() {
    check_vocab("refact");
}

#[test]
fn vectors_qwen35() {
    check_vocab("qwen35");
}

#[test]
fn vectors_gemma4() {
    check_vocab("gemma-4");
}

#[test]
fn sentencepiece_model_matches_llama_spm_vectors() {
    let path = common::shared_data("llama2-tokenizer/tokenizer.model");
    let tok = Tokenizer::from_sentencepiece_file(&path).expect("tokenizer.model loads");
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.eos_ids.first(), Some(&2));
    assert!(tok.add_bos);
    check_vectors(&tok, "llama-spm");
    check_round_trip(&tok, "llama-spm (tokenizer.model)", &cases("llama-spm"));
    // BOS only with add_special; "<s>" in the text is the BOS token unless parsed as text.
    assert_eq!(tok.encode("Hello", true).unwrap(), vec![1, 15043]);
    assert_eq!(tok.encode("Hello", false).unwrap(), vec![15043]);
    assert_eq!(tok.encode("<s>Hello", false).unwrap(), vec![1, 15043]);
    assert_ne!(tok.encode_plain("<s>Hello").unwrap()[0], 1);
    assert_eq!(tok.encode("", true).unwrap(), vec![1]);
    assert_eq!(tok.decode(&[1, 15043, 2], true).unwrap(), "Hello");
    assert_eq!(tok.decode(&[1, 15043, 2], false).unwrap(), "<s> Hello</s>");
}

#[test]
fn special_tokens_and_bos() {
    let spm = vocab("llama-spm");
    assert_eq!(spm.bos_id, Some(1));
    assert!(spm.add_bos);
    assert_eq!(
        spm.encode("Hello world", true).unwrap(),
        vec![1, 15043, 3186]
    );
    assert_eq!(spm.id_to_token(15043).as_deref(), Some("▁Hello"));
    assert_eq!(spm.token_to_id("<0x0A>"), Some(13));

    let l3 = vocab("llama-bpe");
    let bot = l3
        .token_to_id("<|begin_of_text|>")
        .expect("<|begin_of_text|>");
    assert_eq!(l3.bos_id, Some(bot));
    assert!(l3.add_bos);
    let eot = l3.token_to_id("<|eot_id|>").expect("<|eot_id|>");
    assert!(l3.eos_ids.contains(&eot));
    let ids = l3
        .encode("<|start_header_id|>user<|end_header_id|>", true)
        .unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[0], bot);
    assert!(l3.encode_plain("<|eot_id|>").unwrap().len() > 1);
    assert_eq!(l3.decode(&[bot, 9906], true).unwrap(), "Hello");
    assert_eq!(
        l3.decode(&[bot, 9906], false).unwrap(),
        "<|begin_of_text|>Hello"
    );

    let q = vocab("qwen2");
    let ims = q.token_to_id("<|im_start|>").expect("<|im_start|>");
    let ime = q.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert!(q.eos_ids.contains(&ime));
    let ids = q.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&ims));
    assert_eq!(ids.last(), Some(&ime));
    assert_eq!(q.decode(&ids, true).unwrap(), "user\nhi");

    // An id past the vocabulary is an error, not a panic.
    assert!(q.decode(&[u32::MAX], false).is_err());
    let mut s = DecodeStream::new();
    assert!(s.push(q, u32::MAX).is_err());
}

#[test]
fn smollm2_gguf_vocabulary() {
    let path = common::smollm2_gguf();
    let meta = gguf_metadata(&path);
    match meta.get("tokenizer.ggml.pre") {
        Some(gguf_file::Value::String(s)) => assert_eq!(s, "smollm"),
        other => panic!("tokenizer.ggml.pre: {other:?}"),
    }
    let tok = Tokenizer::from_gguf_metadata(&meta, &path).expect("SmolLM2 vocabulary");
    assert_eq!(tok.vocab_size(), 49152);

    let ims = tok.token_to_id("<|im_start|>").expect("<|im_start|>");
    let ime = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![ims]);
    let plain = tok.encode_plain("<|im_start|>").unwrap();
    assert!(plain.len() > 1 && !plain.contains(&ims), "{plain:?}");
    assert!(tok.eos_ids.contains(&ime), "{:?}", tok.eos_ids);

    // Plausible ids for ordinary text: "Hello" and " world" are single tokens.
    let hello = tok.token_to_id("Hello").expect("Hello");
    let world = tok.token_to_id("Ġworld").expect("Ġworld");
    assert_eq!(tok.encode_plain("Hello world").unwrap(), vec![hello, world]);
    // The smollm pre-tokenizer splits digits one by one.
    let digits = tok.encode_plain("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");

    let chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(chat, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == ims).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == ime).count(), 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);

    check_round_trip(&tok, "smollm2", &cases("llama-bpe"));
}

#[test]
fn hf_tokenizer_json() {
    let path = common::shared_data("t5-small-tokenizer/tokenizer.json");
    let tok = Tokenizer::from_hf_file(&path).expect("tokenizer.json loads");
    let text = "translate English to German: The house is wonderful.";
    // The file's post-processor appends </s> (id 1).
    assert_eq!(
        tok.encode(text, true).unwrap(),
        vec![13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]
    );
    assert_eq!(
        tok.encode(text, false).unwrap(),
        vec![13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5]
    );
    assert!(tok.encode_plain("</s>").unwrap().len() > 1);
    assert_eq!(tok.encode("</s>", false).unwrap(), vec![1]);
    assert_eq!(
        tok.decode(&tok.encode(text, true).unwrap(), true).unwrap(),
        text
    );

    // Streaming through the file's Metaspace decoder.
    let ids = tok.encode(text, true).unwrap();
    let deltas = check_stream(&tok, &ids, true, "t5");
    assert_eq!(deltas.concat(), text);
    assert_eq!(deltas[0], "translate");

    let missing = Tokenizer::from_hf_file(Path::new("/nonexistent/tokenizer.json"));
    assert!(missing.is_err());
}

#[test]
fn bad_gguf_metadata_is_an_error() {
    use gguf_file::Value;
    let path = Path::new("bad.gguf");
    let mut meta = std::collections::HashMap::new();
    assert!(Tokenizer::from_gguf_metadata(&meta, path).is_err());
    meta.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("rwkv".into()),
    );
    meta.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(vec![Value::String("a".into())]),
    );
    let e = Tokenizer::from_gguf_metadata(&meta, path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported") && e.contains("bad.gguf"), "{e}");
    meta.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("gpt2".into()),
    );
    meta.insert("tokenizer.ggml.merges".to_string(), Value::Array(vec![]));
    meta.insert(
        "tokenizer.ggml.pre".to_string(),
        Value::String("kimi-k2".into()),
    );
    let e = Tokenizer::from_gguf_metadata(&meta, path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported pre-tokenizer"), "{e}");
    meta.insert("tokenizer.ggml.tokens".to_string(), Value::U32(3));
    assert!(Tokenizer::from_gguf_metadata(&meta, path).is_err());

    let e = Tokenizer::from_sentencepiece_file(Path::new("/nonexistent/tokenizer.model"));
    assert!(e.is_err());
    // A file that is not a SentencePiece model.
    let inp = common::vocab_gguf("llama-spm").with_extension("gguf.inp");
    assert!(Tokenizer::from_sentencepiece_file(&inp).is_err());
}

/// Streams `ids` one by one; checks that no delta holds a partial character and that the
/// deltas add up to `decode(ids, skip_special)`.
fn check_stream(tok: &Tokenizer, ids: &[u32], skip_special: bool, what: &str) -> Vec<String> {
    let mut stream = DecodeStream::with_skip_special(skip_special);
    let mut deltas = Vec::new();
    for &id in ids {
        if let Some(d) = stream.push(tok, id).expect("push") {
            assert!(
                !d.contains('\u{FFFD}'),
                "{what}: delta {d:?} holds a broken character"
            );
            deltas.push(d);
        }
    }
    if let Some(d) = stream.flush(tok).expect("flush") {
        deltas.push(d);
    }
    let whole = tok.decode(ids, skip_special).expect("decode");
    assert_eq!(deltas.concat(), whole, "{what}: deltas {deltas:?}");
    deltas
}

#[test]
fn streaming_deltas_are_whole_characters() {
    let texts = [
        "你好，世界！我想在apple工作1314151天～",
        "Emoji: 🦙🚀 😶‍🌫️ ✅ and 👨‍👩‍👧‍👦 done",
        " leading space, then\nnew lines\n\n and tabs\t!",
        "нещо на Български ကန်တော့ 🦙.cpp",
    ];
    let spm = vocab("llama-spm");
    let l3 = vocab("llama-bpe");
    let q = vocab("qwen2");
    for text in texts {
        for (tok, name) in [(spm, "llama-spm"), (l3, "llama-bpe"), (q, "qwen2")] {
            let ids = tok.encode(text, true).expect("encode");
            let deltas = check_stream(tok, &ids, true, name);
            // SentencePiece: the first word loses the prefix space, later ones keep theirs.
            assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
            if name != "llama-spm" || !text.starts_with(' ') {
                assert_eq!(deltas.concat(), text, "{name}");
            }
            check_stream(tok, &ids, false, name);
        }
    }
    // Byte-fallback pieces of one character arrive together: "𠜎" is not a LLaMA piece, so
    // it is "▁" then <0xF0><0xA0><0x9C><0x8E>.
    let ids = spm.encode_plain("𠜎").unwrap();
    let n_bytes = ids
        .iter()
        .filter(|&&i| spm.id_to_token(i).is_some_and(|t| t.starts_with("<0x")))
        .count();
    assert_eq!(n_bytes, 4, "{ids:?}");
    let mut s = DecodeStream::new();
    let outs: Vec<Option<String>> = ids.iter().map(|&i| s.push(spm, i).unwrap()).collect();
    assert_eq!(
        outs.last().cloned().flatten().as_deref(),
        Some("𠜎"),
        "{outs:?}"
    );
    assert!(
        outs[..outs.len() - 1].iter().all(Option::is_none),
        "{outs:?}"
    );
    // A dangling partial character is released by flush.
    let mut s = DecodeStream::new();
    for &i in &ids[..ids.len() - 1] {
        assert_eq!(s.push(spm, i).unwrap(), None);
    }
    assert!(s
        .flush(spm)
        .unwrap()
        .is_some_and(|t| t.ends_with('\u{FFFD}')));
    assert_eq!(s.flush(spm).unwrap(), None);
    // The same with byte-level BPE: an emoji split over tokens.
    let ids = l3.encode_plain("🦙").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let mut s = DecodeStream::new();
    let outs: Vec<Option<String>> = ids.iter().map(|&i| s.push(l3, i).unwrap()).collect();
    assert_eq!(
        outs.last().cloned().flatten().as_deref(),
        Some("🦙"),
        "{outs:?}"
    );
    // SentencePiece spaces between words survive streaming.
    let ids = spm.encode("Hello world again", true).unwrap();
    let deltas = check_stream(spm, &ids, true, "spm words");
    assert_eq!(deltas, vec!["Hello", " world", " again"]);
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<DecodeStream>();
}
