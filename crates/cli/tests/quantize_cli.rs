//! `camelid quantize` and `camelid perplexity` on bad input and at their edges: one-line errors,
//! fallbacks announced, and never a partial output file.

mod common;

use common::fixture;
use std::path::{Path, PathBuf};
use std::process::Output;

const SUITE: &str = "quantize-cli";

fn camelid(args: &[&str]) -> Output {
    common::camelid(SUITE, args)
}

fn scratch(name: &str) -> PathBuf {
    common::scratch(SUITE, name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn expect_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "\"{n}\" missing from: {stderr}");
    }
}

/// Nothing but `keep` in `dir`: no temporary or partial files.
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep, "files left in {}", dir.display());
}

#[test]
fn unknown_type_lists_the_valid_ones() {
    let dir = scratch("unknown");
    let out = dir.join("x.gguf");
    let o = camelid(&[
        "quantize",
        "-m",
        s(&fixture("quant/tiny_llama")),
        "--to",
        "Q3_X",
        "-o",
        s(&out),
    ]);
    expect_error(
        &o,
        &[
            "Q3_X",
            "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F16, BF16, F32",
        ],
    );
    only(&dir, &[]);
}

#[test]
fn missing_output_directory() {
    let dir = scratch("missing");
    let out = dir.join("no/such/dir/x.gguf");
    let o = camelid(&[
        "quantize",
        "-m",
        s(&fixture("quant/tiny_llama")),
        "--to",
        "Q8_0",
        "-o",
        s(&out),
    ]);
    expect_error(&o, &["output directory", "does not exist"]);
    only(&dir, &[]);
}

#[test]
fn rows_off_the_block_fall_back_and_say_so() {
    let dir = scratch("fallback");
    let out = dir.join("s.gguf");
    let o = camelid(&[
        "quantize",
        "-m",
        s(&fixture("parity/smollm2_shape")),
        "--to",
        "Q6_K",
        "-o",
        s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // 48-wide rows: Q6_K → Q8_0 needs 32 | 48: no → F16; ffn_down's 128: Q8_0.
    assert!(
        stderr.contains("blk.0.attn_q.weight: rows of 48 values are not a multiple of Q6_K's block of 256; written as F16"),
        "{stderr}"
    );
    assert!(
        stderr.contains("blk.0.ffn_down.weight: rows of 128 values are not a multiple of Q6_K's block of 256; written as Q8_0"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("wrote") && stdout.contains("F16"),
        "{stdout}"
    );
    only(&dir, &["s.gguf"]);
}

#[test]
fn truncated_inputs_leave_no_file() {
    let dir = scratch("truncated");
    // A GGUF cut in the middle of its tensor data.
    let good = dir.join("good.gguf");
    let o = camelid(&[
        "quantize",
        "-m",
        s(&fixture("quant/tiny_llama")),
        "--to",
        "F16",
        "-o",
        s(&good),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&good).expect("read");
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let out = dir.join("out.gguf");
    let o = camelid(&["quantize", "-m", s(&cut), "--to", "Q4_0", "-o", s(&out)]);
    expect_error(&o, &["cut.gguf", "truncated"]);

    // A safetensors file cut short.
    let hf = scratch("truncated-hf");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture("quant/tiny_llama").join(f), hf.join(f)).expect("copy");
    }
    let st = hf.join("model.safetensors");
    let len = std::fs::metadata(&st).expect("len").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .and_then(|f| f.set_len(len - 1000))
        .expect("truncate");
    let o = camelid(&["quantize", "-m", s(&hf), "--to", "Q4_0", "-o", s(&out)]);
    expect_error(&o, &["model.safetensors", "truncated"]);
    only(&dir, &["cut.gguf", "good.gguf"]);
}

#[test]
fn requantized_file_runs_and_scores() {
    let dir = scratch("ppl");
    let out = dir.join("q.gguf");
    let o = camelid(&[
        "quantize",
        "-m",
        s(&fixture("quant/tiny_llama")),
        "--to",
        "Q5_K",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = dir.join("t.txt");
    std::fs::write(&text, "the theme in the thin thing then ".repeat(40)).expect("write");
    for extra in [&["--ctx", "32"][..], &["--ctx", "32", "--stride", "16"][..]] {
        let mut args = vec!["perplexity", "-m", s(&out), "-f", s(&text), "--json"];
        args.extend_from_slice(extra);
        let o = camelid(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
        let ppl = v["ppl"].as_f64().expect("ppl");
        assert!(ppl.is_finite() && ppl > 1.0, "{stdout}");
    }
    // Too short a text for llama.cpp's method: a clear error.
    std::fs::write(&text, "the theme").expect("write");
    let o = camelid(&["perplexity", "-m", s(&out), "-f", s(&text), "--ctx", "32"]);
    expect_error(&o, &["tokens", "2 × ctx"]);
}
