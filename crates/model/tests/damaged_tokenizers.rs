//! A damaged SentencePiece `tokenizer.model` (LLaMA-2's): bytes changed across the file and the
//! file cut short. Each must load as a clear error or as a tokenizer that encodes and decodes a
//! text; none may panic.

mod common;

use camelid_model::tokenizer::Tokenizer;
use std::panic::{catch_unwind, AssertUnwindSafe};

#[test]
fn a_damaged_sentencepiece_model_is_an_error_or_works() {
    let good = std::fs::read(common::shared_data("llama2-tokenizer/tokenizer.model"))
        .expect("LLaMA-2's tokenizer.model");
    let dir = std::env::temp_dir().join(format!("camelid-damaged-spm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let path = dir.join("tokenizer.model");
    let n = good.len();
    // The first pieces (the special and byte tokens), the trainer and normalizer specs at the
    // end, and a spread through the middle.
    let positions: Vec<usize> = (0..128)
        .chain((128..n - 256).step_by(16411))
        .chain(n - 256..n)
        .collect();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for &at in &positions {
        for value in [0xff, good[at] ^ 0x01] {
            let mut bytes = good.clone();
            bytes[at] = value;
            cases.push((format!("byte {at} = {value:#x}"), bytes));
        }
        cases.push((format!("cut at {at}"), good[..at].to_vec()));
    }
    let (mut errors, mut works, mut panics) = (0, 0, Vec::new());
    for (case, bytes) in cases {
        std::fs::write(&path, &bytes).expect("write");
        let result = catch_unwind(AssertUnwindSafe(|| {
            let tok = Tokenizer::from_sentencepiece_file(&path)?;
            let ids = tok.encode("Hello world, 123 çé 😀 <s>\n\t", true)?;
            tok.decode(&ids, false)
        }));
        match result {
            Ok(Ok(_)) => works += 1,
            Ok(Err(e)) => {
                assert!(e.to_string().contains("tokenizer.model"), "{case}: {e}");
                errors += 1
            }
            Err(p) => panics.push(format!(
                "{case}: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
    assert!(errors > 0 && works > 0, "{errors} errors, {works} working");
    eprintln!("{errors} refused with an error, {works} loaded and worked");
}
