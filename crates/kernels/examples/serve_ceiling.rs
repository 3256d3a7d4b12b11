//! The most a serving step on SmolLM2-135M-Instruct `Q4_1` could deliver if it did nothing but
//! its quantized products: every projection of its 30 layers (`Q4_1`: q 576×576, k and v
//! 192×576, o 576×576, gate and up 1536×576, down 576×1536, grouped as the model groups them)
//! for TOKENS rows per step, and the tied `Q8_0` head (49152×576) for the rows that sample. No
//! attention, norms, rotary, sampling, scheduling or HTTP: a ceiling, not a forecast.
//!
//! `cargo run --release -p camelid-kernels --example serve_ceiling [TOKENS] [PREFILL] [PROMPT] [OUTPUT] [REPS]`
//!
//! PROMPT and OUTPUT are the token counts of a serving workload (default: the serving table's
//! 32 clients × 2 requests, as `batch_replay` reports them: 2,278 prompt and 4,096 output
//! tokens). Prompt tokens pass the layers in pieces of PREFILL (default 512, the scheduler's
//! step budget), output tokens in steps of TOKENS rows (default 32), each with one head row.
//! The printed ceiling is OUTPUT over the wall time those products take on the whole pool;
//! weights are random (the kernels' time does not depend on the values).

mod common;

use camelid_kernels::{matmul_group, on_pool, quantize_weights, QMatrix, QType};
use common::{cpu_seconds, Lcg};
use std::time::Instant;

fn main() {
    let args = common::numeric_args();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (tokens, prefill, prompt, output, reps) = (
        arg(0, 32),
        arg(1, 512),
        arg(2, 2278),
        arg(3, 4096),
        arg(4, 10),
    );
    let (hidden, kv, inter, vocab, layers) = (576, 192, 1536, 49152, 30);
    let mut lcg = Lcg::new(1);
    let mut matrix = |ty: QType, rows: usize, cols: usize| {
        let w = quantize_weights(ty, &lcg.values(rows * cols));
        QMatrix::from_bytes(ty, rows, cols, &w).expect("valid shapes")
    };
    let q41 = QType::Q4_1;
    let blocks: Vec<[QMatrix; 7]> = (0..layers)
        .map(|_| {
            [
                matrix(q41, hidden, hidden),
                matrix(q41, kv, hidden),
                matrix(q41, kv, hidden),
                matrix(q41, hidden, hidden),
                matrix(q41, inter, hidden),
                matrix(q41, inter, hidden),
                matrix(q41, hidden, inter),
            ]
        })
        .collect();
    let head = matrix(QType::Q8_0, vocab, hidden);
    // Wall and CPU seconds per pass of all layers, and of the head, at `tokens` rows. On a
    // thread of the pool, as a forward pass runs (from outside, every product would be handed
    // into the pool across threads).
    let time = |tokens: usize| {
        let mut lcg = Lcg::new(2);
        let (x, h) = (lcg.values(tokens * hidden), lcg.values(tokens * inter));
        let out = |n: usize| vec![0f32; tokens * n];
        let (mut q, mut k, mut v, mut o) = (out(hidden), out(kv), out(kv), out(hidden));
        let (mut gate, mut up, mut down, mut logits) =
            (out(inter), out(inter), out(hidden), out(vocab));
        let mut layer_pass = || {
            for [wq, wk, wv, wo, wg, wu, wd] in &blocks {
                let qkv = &mut [&mut q[..], &mut k[..], &mut v[..]];
                matmul_group(&[wq, wk, wv], &x, tokens, qkv).expect("shapes");
                matmul_group(&[wo], &x, tokens, &mut [&mut o]).expect("shapes");
                matmul_group(&[wg, wu], &x, tokens, &mut [&mut gate, &mut up]).expect("shapes");
                matmul_group(&[wd], &h, tokens, &mut [&mut down]).expect("shapes");
            }
        };
        on_pool(&mut layer_pass); // first touch of the outputs and the pool's threads
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        on_pool(|| (0..reps).for_each(|_| layer_pass()));
        let layers = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        let mut head_pass = || {
            matmul_group(&[&head], &x, tokens, &mut [&mut logits]).expect("shapes");
        };
        on_pool(&mut head_pass);
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        on_pool(|| (0..reps).for_each(|_| head_pass()));
        let head = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        let r = reps as f64;
        (layers.0 / r, layers.1 / r, head.0 / r, head.1 / r)
    };
    let (layers_s, layers_cpu, head_s, head_cpu) = time(tokens);
    let (prefill_s, prefill_cpu, _, _) = time(prefill);

    // Prompts pass the layers in pieces of PREFILL tokens, output tokens in steps of TOKENS
    // rows, each with its head row.
    let total = prompt as f64 / prefill as f64 * prefill_s
        + output as f64 / tokens as f64 * (layers_s + head_s);
    println!(
        "{{\"tokens_per_step\": {tokens}, \"layers_ms\": {:.3}, \"layers_cpu_ms\": {:.3}, \
         \"head_ms\": {:.3}, \"head_cpu_ms\": {:.3}, \"prefill_tokens_per_step\": {prefill}, \
         \"prefill_layers_ms\": {:.3}, \"prefill_layers_cpu_ms\": {:.3}, \
         \"prompt_tokens\": {prompt}, \"output_tokens\": {output}, \"products_s\": {total:.3}, \
         \"ceiling_output_tok_per_s\": {:.1}}}",
        layers_s * 1e3,
        layers_cpu * 1e3,
        head_s * 1e3,
        head_cpu * 1e3,
        prefill_s * 1e3,
        prefill_cpu * 1e3,
        output as f64 / total,
    );
}
