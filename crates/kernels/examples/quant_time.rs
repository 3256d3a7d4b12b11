//! Time of the activation quantization of one product's input (SmolLM2-135M's widths 576 and
//! 1536 at 1 to 256 tokens): the blocks then their sums in a second pass, both in one pass, and
//! the one pass with the rows split over two tasks of the pool (best of 20 batches, in µs):
//! `cargo run --release -p camelid-kernels --example quant_time`.

use camelid_kernels::{quantize_into, quantize_with_sums, ActBlock};
use rayon::prelude::*;
use std::time::Instant;

fn best_of(mut f: impl FnMut()) -> f64 {
    let reps = 2000;
    (0..20)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..reps {
                f();
            }
            t0.elapsed().as_secs_f64() / reps as f64 * 1e6
        })
        .fold(f64::MAX, f64::min)
}

fn run() {
    for (t, c) in [(1, 576), (32, 576), (32, 1536), (128, 576), (256, 1536)] {
        let x: Vec<f32> = (0..t * c)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let n = t * c / 32;
        let (mut b, mut s) = (vec![ActBlock::default(); n], vec![0i32; n]);
        let two = best_of(|| {
            quantize_into(&x, &mut b);
            for (s, a) in s.iter_mut().zip(&b) {
                *s = 128 * a.qs.iter().map(|&q| q as i32).sum::<i32>();
            }
            std::hint::black_box(&s);
        });
        let one = best_of(|| {
            quantize_with_sums(&x, &mut b, &mut s);
            std::hint::black_box(&s);
        });
        let rows = t.div_ceil(2);
        let split = best_of(|| {
            b.par_chunks_mut(rows * c / 32)
                .zip(x.par_chunks(rows * c))
                .zip(s.par_chunks_mut(rows * c / 32))
                .for_each(|((b, x), s)| quantize_with_sums(x, b, s));
            std::hint::black_box(&s);
        });
        println!("{t}×{c}: two passes {two:.2} µs, one pass {one:.2} µs, split {split:.2} µs");
    }
}

fn main() {
    // On a worker of the pool, as the model's products run.
    rayon::join(run, || ());
}
