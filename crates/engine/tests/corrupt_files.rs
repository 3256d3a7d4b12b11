//! Damaged checkpoints: each byte of a GGUF or safetensors header changed, GGUF files cut at
//! many lengths, and each field of a `config.json` given a wrong value. Every case must load as
//! a clear error or as a model that runs three tokens, and (for some sweeps) quantize to an
//! error or a written file; none may panic or abort the process (an abort, e.g. an allocation
//! of terabytes, ends this test binary: that is a failure too).

use camelid_engine::embed::embed_ids;
use camelid_engine::generate::all_logits;
use camelid_engine::seq2seq::decoder_logits;
use camelid_model::Model;
use camelid_quant::{quantize, QuantizeOptions};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn fixtures(dir: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(dir);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixture folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("camelid-corrupt-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// What one action did with a damaged input: `Ok(true)` it worked, `Ok(false)` it was refused
/// with an error (whose message is checked), `Err` the panic's message.
type Outcome = Result<bool, String>;

fn caught(action: impl FnOnce() -> Result<(), String>) -> Outcome {
    catch_unwind(AssertUnwindSafe(|| match action() {
        Ok(()) => true,
        Err(e) => {
            assert!(e.len() > 10, "an error without a message: {e}");
            false
        }
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Loads the model at `path` and, when that works, runs three tokens through it (logits from
/// the decoder, and the pooled embedding where there is no decoder of its own) and a text
/// through its tokenizer.
fn loads(path: &Path) -> Result<(), String> {
    let model = Model::load(path, &Device::Cpu).map_err(|e| e.to_string())?;
    let ids = [1, 2, 3];
    let ran = if model.is_encoder_decoder() {
        decoder_logits(&model, &ids, &[0, 1]).map(drop)
    } else if model.spec().lm_head {
        embed_ids(&model, &ids).and_then(|_| all_logits(&model, &ids).map(drop))
    } else {
        // An encoder (BERT) has no head: it gives embeddings only.
        embed_ids(&model, &ids).map(drop)
    };
    // A damaged vocabulary shows when text goes through it.
    let ran = ran.and_then(|()| match &model.tokenizer {
        Some(tok) => {
            let ids = tok.encode("Hello world, 123 çé 😀 <s>\n\t", true)?;
            tok.decode(&ids, false).map(drop)
        }
        None => Ok(()),
    });
    ran.map_err(|e| format!("loads, then: {e}"))
}

/// Quantizes the checkpoint at `path` to Q8_0, next to it.
fn quantizes(path: &Path) -> Result<(), String> {
    let opts = QuantizeOptions {
        to: GgmlDType::Q8_0,
        keep_output: false,
        keep_embeddings: false,
        mix: None,
    };
    let out = path.with_extension("q8_0.gguf");
    quantize(path, &out, &opts, &AtomicBool::new(false), &mut |_| {})
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Loading, then quantizing: the outcome is loading's; either may not panic.
fn loads_and_quantizes(path: &Path) -> Outcome {
    let loaded = caught(|| loads(path))?;
    caught(|| quantizes(path))?;
    Ok(loaded)
}

/// Loads and quantizes every case; fails listing the ones that panicked. Also checks the sweep
/// did reach both kinds of outcome, so that it cannot pass by loading nothing.
fn sweep(what: &str, cases: impl Iterator<Item = (String, PathBuf)>) {
    let (mut errors, mut runs, mut panics) = (0, 0, Vec::new());
    for (case, path) in cases {
        match loads_and_quantizes(&path) {
            Ok(true) => runs += 1,
            Ok(false) => errors += 1,
            Err(msg) => panics.push(format!("{case}: {msg}")),
        }
    }
    assert!(
        panics.is_empty(),
        "{what}: {} cases panicked:\n{}",
        panics.len(),
        panics.join("\n")
    );
    assert!(errors > 0, "{what}: no case was refused");
    eprintln!("{what}: {errors} refused with an error, {runs} loaded and ran");
}

fn gguf_fixtures() -> Vec<(String, Vec<u8>, usize)> {
    fixtures("llamacpp_families")
        .into_iter()
        .map(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(dir.join("model.gguf")).expect("fixture GGUF");
            let header = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
                .expect("the fixture parses")
                .tensor_data_offset as usize;
            (name, bytes, header)
        })
        .collect()
}

/// Every position of the first KiB (counts, keys, types, the first values), then every 7th:
/// past it lie mostly the vocabulary's strings, where one position stands for its neighbours.
fn positions(header: usize) -> impl Iterator<Item = usize> {
    (0..header.min(1024)).chain((1024..header).step_by(7))
}

/// Copies of `good` with the byte at each position changed: to 0xff (the high byte of a count
/// or a size becomes huge) and to itself with the low bit flipped (off by one).
fn byte_changes<'a>(
    good: &'a [u8],
    positions: impl Iterator<Item = usize> + 'a,
) -> impl Iterator<Item = (String, Vec<u8>)> + 'a {
    positions.flat_map(move |at| {
        [0xff, good[at] ^ 0x01].map(|value| {
            let mut bytes = good.to_vec();
            bytes[at] = value;
            (format!("byte {at} = {value:#x}"), bytes)
        })
    })
}

#[test]
fn each_gguf_header_byte_changed() {
    let path = scratch("header").join("model.gguf");
    for (name, good, header) in gguf_fixtures() {
        let path = &path;
        sweep(
            &format!("{name}: header bytes changed"),
            byte_changes(&good, positions(header)).map(|(case, bytes)| {
                std::fs::write(path, bytes).expect("write");
                (format!("{name} {case}"), path.clone())
            }),
        );
    }
}

#[test]
fn each_gguf_file_cut_short() {
    let path = scratch("cut").join("model.gguf");
    for (name, good, header) in gguf_fixtures() {
        // Lengths within the header, then 64 through the tensor data.
        let data = good.len() - header;
        let lengths = positions(header).chain((0..64).map(|i| header + i * data / 64));
        let path = &path;
        let good = &good;
        sweep(
            &format!("{name}: cut short"),
            lengths.map(|len| {
                std::fs::write(path, &good[..len]).expect("write");
                (format!("{name} cut at {len}"), path.clone())
            }),
        );
    }
}

#[test]
fn each_safetensors_header_byte_changed() {
    for family in ["gpt2", "llama_mha_f32"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/parity")
            .join(family);
        let work = scratch(&format!("st-{family}"));
        std::fs::copy(dir.join("config.json"), work.join("config.json")).expect("copy");
        let good = std::fs::read(dir.join("model.safetensors")).expect("fixture");
        let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let work = &work;
        sweep(
            &format!("{family}: safetensors header bytes changed"),
            byte_changes(&good, 0..header).map(|(case, bytes)| {
                std::fs::write(work.join("model.safetensors"), bytes).expect("write");
                (format!("{family} {case}"), work.clone())
            }),
        );
    }
}

#[test]
fn each_config_field_given_a_wrong_value() {
    let wrong = [
        json!(0),
        json!(-1),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(1e30),
        json!(0.5),
        json!("x"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
    ];
    let dirs = [fixtures("parity"), fixtures("t5"), fixtures("bert")].concat();
    for dir in dirs {
        let family = dir.file_name().unwrap().to_string_lossy().into_owned();
        let work = scratch(&format!("config-{family}"));
        for entry in std::fs::read_dir(&dir).expect("fixture") {
            let from = entry.expect("entry").path();
            let name = from.file_name().unwrap();
            if name != "config.json" && name != "reference.json" {
                std::fs::copy(&from, work.join(name)).expect("copy");
            }
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config.json"))
                .expect("the fixture's config parses");
        let fields: Vec<String> = config
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        let config = &config;
        let work = &work;
        let cases = fields.iter().flat_map(|field| {
            wrong
                .iter()
                .map(move |v| (field.clone(), Some(v.clone())))
                .chain([(field.clone(), None)])
        });
        sweep(
            &format!("{family}: config fields"),
            cases.map(|(field, value)| {
                let mut c = config.clone();
                let o = c.as_object_mut().unwrap();
                match &value {
                    Some(v) => o.insert(field.clone(), v.clone()),
                    None => o.remove(&field),
                };
                std::fs::write(work.join("config.json"), c.to_string()).expect("write");
                let shown = value.map_or("removed".into(), |v| v.to_string());
                (format!("{family} {field} = {shown}"), work.clone())
            }),
        );
    }
}

/// A field the family reads, given the wrong type, is an error naming it: never a silent
/// default.
#[test]
fn a_field_of_the_wrong_type_is_named() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity");
    for (family, field, value) in [
        ("llama_mha_f32", "hidden_act", json!(0)),
        ("llama_mha_f32", "rope_scaling", json!("x")),
        ("llama_mha_f32", "num_hidden_layers", json!(0.5)),
        ("llama_mha_f32", "tie_word_embeddings", json!("yes")),
        ("gpt2", "activation_function", json!(["gelu"])),
    ] {
        let work = scratch(&format!("typed-{family}-{field}"));
        for name in ["model.safetensors", "config.json"] {
            std::fs::copy(dir.join(family).join(name), work.join(name)).expect("copy");
        }
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(work.join("config.json")).unwrap()).unwrap();
        config[field] = value.clone();
        std::fs::write(work.join("config.json"), config.to_string()).unwrap();
        let got = caught(|| loads(&work)).expect("no panic");
        let message = loads(&work).expect_err("refused");
        assert!(
            !got && message.contains(field),
            "{family} {field} = {value}: {message}"
        );
    }
}
