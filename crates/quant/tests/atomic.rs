//! The output appears whole or not at all: a cancelled run (what Ctrl-C does) and a run that
//! fails leave the target directory as it was.

use camelid_quant::{quantize, QuantizeError, QuantizeOptions};
use candle_core::quantized::GgmlDType;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "camelid-quant-atomic-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn source() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant/tiny_llama")
}

fn entries(d: &PathBuf) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn cancelled_run_leaves_nothing() {
    let d = scratch("cancel");
    let opts = QuantizeOptions {
        to: GgmlDType::Q4_0,
        keep_output: false,
        keep_embeddings: false,
        mix: None,
    };
    let mut seen = 0;
    let cancel = AtomicBool::new(false);
    let r = quantize(&source(), &d.join("m.gguf"), &opts, &cancel, &mut |e| {
        if let camelid_quant::Event::Tensor { .. } = e {
            seen += 1;
            if seen == 3 {
                // As the Ctrl-C handler does, mid-way through the tensors.
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    assert!(matches!(r, Err(QuantizeError::Cancelled)), "{:?}", r.err());
    assert!(entries(&d).is_empty(), "{:?}", entries(&d));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn existing_output_survives_a_failed_run() {
    let d = scratch("fail");
    let target = d.join("m.gguf");
    std::fs::write(&target, b"previous").unwrap();
    let opts = QuantizeOptions {
        to: GgmlDType::Q8_0,
        keep_output: false,
        keep_embeddings: false,
        mix: None,
    };
    let cancel = AtomicBool::new(true);
    assert!(quantize(&source(), &target, &opts, &cancel, &mut |_| {}).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"previous");
    assert_eq!(entries(&d), vec!["m.gguf".to_string()]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn keep_flags_write_f16() {
    let d = scratch("keep");
    let opts = QuantizeOptions {
        to: GgmlDType::Q4K,
        keep_output: true,
        keep_embeddings: true,
        mix: None,
    };
    let r = quantize(
        &source(),
        &d.join("m.gguf"),
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let ty = |n: &str| r.tensors.iter().find(|t| t.name == n).unwrap().dtype;
    assert_eq!(ty("output.weight"), GgmlDType::F16);
    assert_eq!(ty("token_embd.weight"), GgmlDType::F16);
    assert_eq!(ty("blk.0.attn_q.weight"), GgmlDType::Q4K);
    assert_eq!(ty("output_norm.weight"), GgmlDType::F32);
    std::fs::remove_dir_all(&d).ok();
}
