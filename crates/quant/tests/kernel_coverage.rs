//! Which products of a quantized file camelid's own kernels run, and which go to candle's
//! quantized matmul (on candle's thread pool, which the CLI then does not pin to one thread).
//!
//! Unlike `llama_cpp.rs`, this process keeps camelid's kernels on (no `CAMELID_KERNELS=candle`).

use camelid_model::Model;
use camelid_quant::{quantize, types, QuantizeOptions};
use candle_core::Device;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tiny_llama` (hidden 256, FFN 256, one layer, untied head of 264 rows) quantized to `to`;
/// returns the model and the types its seven projections and head were written as.
fn tiny_llama_as(to: &str, dir: &std::path::Path) -> (Model, Vec<&'static str>) {
    let (to_ty, mix) = types::parse_target(to).unwrap();
    let opts = QuantizeOptions {
        to: to_ty,
        keep_output: false,
        keep_embeddings: false,
        mix,
    };
    let out = dir.join(format!("tiny_llama_{to}.gguf"));
    let src = root().join("tests/fixtures/quant/tiny_llama");
    let report = quantize(&src, &out, &opts, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let written = report
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && t.name != "token_embd.weight")
        .map(|t| types::name(t.dtype))
        .collect();
    (Model::load(&out, &Device::Cpu).unwrap(), written)
}

#[test]
fn candle_runs_only_the_types_without_a_kernel() {
    let dir = std::env::temp_dir().join(format!("camelid-coverage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // (target, products left to candle): Q5_0 and Q5_1 have no camelid kernel yet.
    for (to, want) in [
        ("Q4_0", 0),
        ("Q4_1", 0),
        ("Q8_0", 0),
        ("Q5_0", 8),
        ("Q5_1", 8),
    ] {
        let (model, written) = tiny_llama_as(to, &dir);
        assert_eq!(written.len(), 8, "{to}: {written:?}");
        assert_eq!(
            model.candle_quantized_products(),
            want,
            "{to}: tensors written as {written:?}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
