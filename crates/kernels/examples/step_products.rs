//! The MLP products of a serving step on SmolLM2-135M's shapes (`Q4_1` gate and up 1536 × 576,
//! down 576 × 1536) for TOKENS rows, over LAYERS distinct layers: 1 layer stays in cache, 30
//! stream their 66 MB of weights as the step does. Prints the process's CPU time per token, per
//! 32-value block and per 8-row group (robust on a shared machine, unlike wall time):
//! `cargo run --release -p camelid-kernels --example step_products [TOKENS] [LAYERS] [REPS]`
//! (run it with `RAYON_NUM_THREADS=1` to time one core).

mod common;

use camelid_kernels::{matmul_group, quantize_weights, QMatrix, QType};
use common::{cpu_seconds, Lcg};

fn main() {
    let args = common::numeric_args();
    let tokens = args.first().copied().unwrap_or(32);
    let layers = args.get(1).copied().unwrap_or(30);
    let reps = args.get(2).copied().unwrap_or(20);
    let mut lcg = Lcg::new(1);
    let mut rnd = |n: usize| lcg.values(n);
    let mut matrix = |rows: usize, cols: usize| {
        let w = quantize_weights(QType::Q4_1, &rnd(rows * cols));
        QMatrix::from_bytes(QType::Q4_1, rows, cols, &w).expect("valid shapes")
    };
    let (hidden, inter) = (576, 1536);
    let mlps: Vec<[QMatrix; 3]> = (0..layers)
        .map(|_| {
            [
                matrix(inter, hidden),
                matrix(inter, hidden),
                matrix(hidden, inter),
            ]
        })
        .collect();
    let (x, h) = (rnd(tokens * hidden), rnd(tokens * inter));
    let (mut gate, mut up, mut down) = (
        vec![0f32; tokens * inter],
        vec![0f32; tokens * inter],
        vec![0f32; tokens * hidden],
    );
    let start = cpu_seconds();
    for _ in 0..reps {
        for [g, u, d] in &mlps {
            matmul_group(&[g, u], &x, tokens, &mut [&mut gate, &mut up]).expect("shapes");
            matmul_group(&[d], &h, tokens, &mut [&mut down]).expect("shapes");
        }
    }
    let cpu = cpu_seconds() - start;
    let units = (3 * inter * hidden / 8 / 32 * tokens * layers * reps) as f64;
    println!(
        "{tokens} tokens, {layers} layers, {reps} reps: CPU {cpu:.2} s, {:.3} ns per token, block and group (check {})",
        cpu / units * 1e9,
        gate[7] + down[5]
    );
}
