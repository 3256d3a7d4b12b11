//! Time of SwiGLU's `silu(gate) · up` (`camelid_kernels::expf::silu_mul`) on one thread for
//! each path this CPU has, on a 32-row step's gate of SmolLM2-135M (32 × 1536 values, gates
//! spread over ±8): best of 20 batches, ns per value:
//! `cargo run --release -p camelid-kernels --example silu_time`.

mod common;

use camelid_kernels::expf::{silu_mul_on, ExpPath};
use common::Lcg;
use std::time::Instant;

fn main() {
    let n = 32 * 1536;
    let mut lcg = Lcg::new(3);
    let gate: Vec<f32> = lcg.values(n).iter().map(|v| v * 8.0).collect();
    let up = lcg.values(n);
    let mut out = gate.clone();
    for path in ExpPath::available() {
        let reps = 50;
        let best = (0..20)
            .map(|_| {
                let t0 = Instant::now();
                for _ in 0..reps {
                    out.copy_from_slice(&gate);
                    silu_mul_on(path, &mut out, &up);
                    std::hint::black_box(&out);
                }
                t0.elapsed().as_secs_f64() / (reps * n) as f64 * 1e9
            })
            .fold(f64::MAX, f64::min);
        println!("{path:?}: {best:.2} ns per value");
    }
}
