//! `camelid run` on an encoder-decoder directory with t5-small's tokenizer.json: the prompt is
//! encoded as transformers encodes it (`</s>` appended), then greedy decoding and beam search
//! print what transformers' `generate` decodes (`tests/fixtures/t5/t5_tokenizer`, made by
//! `scripts/fixtures/make_parity_t5.py`).

use std::path::PathBuf;
use std::process::Command;

fn shared_data(rel: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("CAMELID_SHARED_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join(rel);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|d| d.join("shared").join("data").join(rel))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("shared/data/{rel} not found (set CAMELID_SHARED_DATA)"))
}

/// The fixture's weights plus t5-small's tokenizer files, in a scratch directory.
fn model_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-t5-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5/t5_tokenizer");
    for e in std::fs::read_dir(&fixture).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(shared_data(&format!("t5-small-tokenizer/{f}")), dir.join(f)).unwrap();
    }
    dir
}

fn camelid(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .args(args)
        .output()
        .expect("run camelid");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "camelid {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[derive(serde::Deserialize)]
struct Reference {
    encoder_ids: Vec<u32>,
    text: String,
    greedy_text: String,
    beam_texts: Vec<Vec<String>>,
    beams: Vec<serde_json::Value>,
}

#[test]
fn run_encodes_and_decodes_like_transformers() {
    let dir = model_dir("run");
    let m = dir.to_str().unwrap();
    let r: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    assert_eq!(
        r.encoder_ids,
        [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]
    );
    let ids: serde_json::Value =
        serde_json::from_str(&camelid(&["tokenize", "-m", m, "--add-special", &r.text])).unwrap();
    assert_eq!(ids["ids"], serde_json::json!(r.encoder_ids));

    let greedy = camelid(&["run", "-m", m, "--temperature", "0", "-n", "12", &r.text]);
    assert_eq!(greedy.trim_end_matches('\n'), r.greedy_text);

    for (b, want) in r.beams.iter().zip(&r.beam_texts) {
        let s = &b["settings"];
        let early = match &s["early_stopping"] {
            serde_json::Value::Bool(x) => x.to_string(),
            other => other.as_str().unwrap().to_string(),
        };
        let args = [
            "run".to_string(),
            "-m".into(),
            m.into(),
            "-n".into(),
            "12".into(),
            "--beams".into(),
            s["num_beams"].to_string(),
            "--length-penalty".into(),
            s["length_penalty"].to_string(),
            "--early-stopping".into(),
            early,
            "--n-best".into(),
            s["num_return_sequences"].to_string(),
            r.text.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = camelid(&args);
        let texts: Vec<String> = out
            .lines()
            .map(|l| match l.split_once('\t') {
                Some((_, t)) if want.len() > 1 => t.to_string(),
                _ => l.to_string(),
            })
            .collect();
        assert_eq!(&texts, want, "beams {s}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn expect_error(args: &[&str], needle: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .args(args)
        .output()
        .expect("run camelid");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: \"{needle}\" missing: {stderr}"
    );
}

#[test]
fn encoder_decoder_flags_reject_bad_input() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let t5 = root.join("t5/flan_t5");
    let t5 = t5.to_str().unwrap();
    let gpt2 = root.join("parity/gpt2");
    let gpt2 = gpt2.to_str().unwrap();
    expect_error(&["logits", "-m", t5, "--ids", "5,6,1"], "--decoder-ids");
    expect_error(
        &["logits", "-m", t5, "--ids", "5,1", "--decoder-ids", "0,x"],
        "--decoder-ids: \"x\"",
    );
    expect_error(
        &["logits", "-m", t5, "--ids", "5,1", "--decoder-ids", "0,999"],
        "token id 999 is outside the vocabulary",
    );
    expect_error(
        &["logits", "-m", gpt2, "--ids", "5,1", "--decoder-ids", "0,7"],
        "not an encoder-decoder model",
    );
    expect_error(
        &["bench", "-m", t5, "-p", "4", "-n", "2", "-r", "1"],
        "encoder-decoder",
    );

    let dir = model_dir("flags");
    let m = dir.to_str().unwrap();
    expect_error(
        &["run", "-m", m, "--beams", "3", "--n-best", "4", "hi"],
        "--n-best 4 exceeds --beams 3",
    );
    // The decoder gets ids back through logits --decoder-ids: one row per decoder id.
    let out = camelid(&[
        "logits",
        "-m",
        m,
        "--ids",
        "13959,1",
        "--decoder-ids",
        "0,37,1",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 3);
    assert_eq!(v["logits"][0].as_array().unwrap().len(), 32128);
    std::fs::remove_dir_all(&dir).ok();
}
