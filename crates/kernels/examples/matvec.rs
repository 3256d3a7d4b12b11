//! Kernel throughput on one 4096×4096 matrix per type and instruction set:
//! `cargo run --release -p camelid-kernels --example matvec [TOKENS] [REPS] [ROWS]`
//! (ROWS 16384 makes the Q4 matrices larger than a 32 MiB L3, so decode reads DRAM).
//! Prints weight bytes read per second (decode, 1 token) or tokens·rows per second.

mod common;

use camelid_kernels::{quantize_weights, Isa, QMatrix, QType};
use common::Lcg;
use std::time::Instant;

fn main() {
    let args = common::numeric_args();
    let tokens = args.first().copied().unwrap_or(1);
    let reps = args.get(1).copied().unwrap_or(50);
    let (rows, cols) = (args.get(2).copied().unwrap_or(4096), 4096);
    let mut lcg = Lcg::new(1);
    let w = lcg.values(rows * cols);
    let x = lcg.values(tokens * cols);
    let mut out = vec![0f32; tokens * rows];
    for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        let bytes = quantize_weights(ty, &w);
        for isa in Isa::available() {
            let m = QMatrix::from_bytes(ty, rows, cols, &bytes)
                .unwrap()
                .with_isa(isa);
            m.matmul(&x, tokens, &mut out).unwrap();
            let t = Instant::now();
            for _ in 0..reps {
                m.matmul(&x, tokens, &mut out).unwrap();
            }
            let sec = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{:5} {:10} tokens {tokens:4}: {:7.2} ms  {:6.2} GB/s of weights  {:8.1} Gop/s",
                ty.name(),
                format!("{isa:?}"),
                sec * 1e3,
                bytes.len() as f64 / sec / 1e9,
                2.0 * (rows * cols * tokens) as f64 / sec / 1e9
            );
        }
    }
}
