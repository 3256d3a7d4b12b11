//! Bad input never crashes: each case exits non-zero with one line on stderr that names the
//! file (or value) and the problem, and no panic.

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
mod common;

use std::path::PathBuf;
use std::process::Output;

const SUITE: &str = "bad-input";

fn camelid(args: &[&str]) -> Output {
    common::camelid(SUITE, args)
}

fn scratch(name: &str) -> PathBuf {
    common::scratch(SUITE, name)
}

fn fixture(case: &str) -> PathBuf {
    common::fixture(&format!("parity/{case}"))
}

/// Copies a parity fixture so a test can damage it.
fn copy_fixture(case: &str, name: &str) -> PathBuf {
    let dst = scratch(name);
    for e in std::fs::read_dir(fixture(case)).expect("fixture") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join(p.file_name().expect("name"))).expect("copy");
    }
    dst
}

/// The error contract: failure, one stderr line starting with "error:", containing `needles`.
fn expect_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "\"{n}\" missing from: {stderr}");
    }
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("llama_mha_f32", "truncated");
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).expect("size").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .expect("open");
    file.set_len(len / 2).expect("truncate");
    let out = camelid(&["logits", "-m", dir.to_str().unwrap(), "--ids", "1,2"]);
    expect_error(&out, &["model.safetensors", "truncated"]);
}

#[test]
fn gguf_with_wrong_magic() {
    let f = scratch("magic").join("bad.gguf");
    std::fs::write(&f, b"NOPE\x03\x00\x00\x00 this is not a gguf file at all").expect("write");
    let out = camelid(&["logits", "-m", f.to_str().unwrap(), "--ids", "1"]);
    expect_error(&out, &["bad.gguf", "not a valid GGUF"]);
}

#[test]
fn gguf_tensor_past_end_of_file() {
    let f = scratch("past-end").join("short.gguf");
    let t = Tensor::zeros((64, 64), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).expect("qtensor");
    let arch = gguf_file::Value::String("llama".into());
    let mut file = std::fs::File::create(&f).expect("create");
    gguf_file::write(
        &mut file,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &q)],
    )
    .expect("write gguf");
    let len = file.metadata().expect("size").len();
    file.set_len(len - 100).expect("truncate");
    drop(file);
    let out = camelid(&["logits", "-m", f.to_str().unwrap(), "--ids", "1"]);
    expect_error(&out, &["short.gguf", "token_embd.weight", "truncated"]);
}

#[test]
fn unknown_model_type() {
    let dir = copy_fixture("llama_mha_f32", "unknown-type");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("\"llama\"", "\"llamazing\"")).expect("write");
    let out = camelid(&["logits", "-m", dir.to_str().unwrap(), "--ids", "1"]);
    expect_error(&out, &["config.json", "unknown model_type \"llamazing\""]);
}

#[test]
fn config_that_does_not_match_the_weights() {
    let dir = copy_fixture("llama_mha_f32", "wrong-config");
    let cfg = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).expect("config")).expect("json");
    json["intermediate_size"] = serde_json::json!(7);
    std::fs::write(&cfg, json.to_string()).expect("write");
    let out = camelid(&["logits", "-m", dir.to_str().unwrap(), "--ids", "1"]);
    expect_error(&out, &["mlp.gate_proj.weight", "shape"]);
}

#[test]
fn missing_tokenizer_only_matters_for_text() {
    let dir = fixture("llama_mha_f32");
    let d = dir.to_str().unwrap();
    let out = camelid(&["run", "-m", d, "hello"]);
    expect_error(&out, &["llama_mha_f32", "no tokenizer"]);
    // Token ids need no tokenizer.
    let out = camelid(&["logits", "-m", d, "--ids", "1,2,3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["ids"], serde_json::json!([1, 2, 3]));
    assert_eq!(json["logits"].as_array().map(Vec::len), Some(3));
}

#[test]
fn prompt_longer_than_the_context_window() {
    // The fixture's window is 64 positions.
    let ids: Vec<String> = (0..65).map(|i| (i % 50).to_string()).collect();
    let out = camelid(&[
        "logits",
        "-m",
        fixture("llama_mha_f32").to_str().unwrap(),
        "--ids",
        &ids.join(","),
    ]);
    expect_error(&out, &["65 tokens", "context window of 64"]);
}

#[test]
fn token_id_outside_the_vocabulary() {
    let out = camelid(&[
        "logits",
        "-m",
        fixture("llama_mha_f32").to_str().unwrap(),
        "--ids",
        "1,99999",
    ]);
    expect_error(&out, &["99999", "outside the vocabulary"]);
}

#[test]
fn non_utf8_prompt_file() {
    let f = scratch("utf8").join("prompt.txt");
    std::fs::write(&f, b"caf\xe9 au lait").expect("write");
    let out = camelid(&[
        "run",
        "-m",
        fixture("llama_mha_f32").to_str().unwrap(),
        "-f",
        f.to_str().unwrap(),
    ]);
    expect_error(&out, &["prompt.txt", "not valid UTF-8"]);
}

#[test]
fn missing_model_path() {
    let out = camelid(&["logits", "-m", "/no/such/model.gguf", "--ids", "1"]);
    expect_error(&out, &["/no/such/model.gguf", "not a catalog model"]);
}

#[test]
fn malformed_ids() {
    let out = camelid(&["logits", "-m", "x", "--ids", "1,two"]);
    expect_error(&out, &["\"two\" is not a token id"]);
}

#[test]
fn a_benchmark_of_nothing() {
    let m = fixture("llama_mha_f32");
    let out = camelid(&["bench", "-m", m.to_str().unwrap(), "-p", "0", "-n", "0"]);
    expect_error(&out, &["nothing to measure"]);
    let out = camelid(&["bench", "-m", m.to_str().unwrap(), "-r", "0"]);
    expect_error(&out, &["--reps must be at least 1"]);
}
