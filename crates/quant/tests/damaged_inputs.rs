//! `quantize` on damaged inputs: each byte of a GGUF header changed (two fixture families), and
//! each field of a `config.json` given a wrong value. Every case is an error or a written file;
//! none may panic.

use camelid_quant::{quantize, QuantizeOptions};
use candle_core::quantized::{gguf_file, GgmlDType};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("camelid-quant-damaged-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&d).expect("scratch folder");
    d
}

/// Quantizes `input` to Q8_0 in `out`: `Ok(true)` written, `Ok(false)` refused, `Err` panicked.
fn outcome(input: &Path, out: &Path) -> Result<bool, String> {
    let opts = QuantizeOptions {
        to: GgmlDType::Q8_0,
        keep_output: false,
        keep_embeddings: false,
        mix: None,
    };
    let cancel = AtomicBool::new(false);
    catch_unwind(AssertUnwindSafe(|| {
        match quantize(input, &out.join("out.gguf"), &opts, &cancel, &mut |_| {}) {
            Ok(_) => true,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        }
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

fn tally(what: &str, results: impl Iterator<Item = (String, Result<bool, String>)>) {
    let (mut written, mut refused, mut panics) = (0, 0, Vec::new());
    for (case, r) in results {
        match r {
            Ok(true) => written += 1,
            Ok(false) => refused += 1,
            Err(msg) => panics.push(format!("{case}: {msg}")),
        }
    }
    assert!(
        panics.is_empty(),
        "{what}: {} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
    assert!(
        written > 0 && refused > 0,
        "{what}: {written} written, {refused} refused"
    );
    eprintln!("{what}: {refused} refused with an error, {written} written");
}

#[test]
fn each_gguf_header_byte_changed() {
    for family in ["qwen1", "mpt_qk_ln"] {
        let good = std::fs::read(
            fixtures()
                .join("llamacpp_families")
                .join(family)
                .join("model.gguf"),
        )
        .expect("fixture");
        let header = gguf_file::Content::read(&mut std::io::Cursor::new(&good))
            .expect("the fixture parses")
            .tensor_data_offset as usize;
        let work = scratch(family);
        let input = work.join("in.gguf");
        // Counts, keys and types lie in the first KiB; past it, mostly vocabulary strings.
        let positions = (0..header.min(1024)).chain((1024..header).step_by(7));
        let cases = positions.flat_map(|at| [0xff, good[at] ^ 0x01].map(|v| (at, v)));
        tally(
            &format!("{family}: header bytes changed"),
            cases.map(|(at, value)| {
                let mut bytes = good.clone();
                bytes[at] = value;
                std::fs::write(&input, &bytes).expect("write");
                (format!("byte {at} = {value:#x}"), outcome(&input, &work))
            }),
        );
    }
}

#[test]
fn each_config_field_given_a_wrong_value() {
    let wrong = [
        json!(0),
        json!(1u64 << 40),
        json!(-1),
        json!("x"),
        json!(null),
        json!([]),
    ];
    for family in ["llama_gqa_sharded_f16", "gpt2", "falcon_40b_style"] {
        let dir = fixtures().join("parity").join(family);
        let work = scratch(&format!("config-{family}"));
        let input = work.join("in");
        std::fs::create_dir_all(&input).expect("input folder");
        for entry in std::fs::read_dir(&dir).expect("fixture") {
            let from = entry.expect("entry").path();
            let name = from.file_name().expect("name");
            if name != "reference.json" {
                std::fs::copy(&from, input.join(name)).expect("copy");
            }
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config"))
                .expect("the fixture's config parses");
        let fields: Vec<String> = config
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        let cases = fields
            .iter()
            .flat_map(|f| wrong.iter().map(move |v| (f.clone(), v.clone())));
        tally(
            &format!("{family}: config fields"),
            cases.map(|(field, value)| {
                let mut c = config.clone();
                c[&field] = value.clone();
                std::fs::write(input.join("config.json"), c.to_string()).expect("write");
                (format!("{field} = {value}"), outcome(&input, &work))
            }),
        );
    }
}
