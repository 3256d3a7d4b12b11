//! Every one of the 2^32 f32 bit patterns through each vector path of `camelid_kernels::expf`
//! against `f32::exp` (the platform's libm), and SwiGLU's `silu(v) · u` (u = 1.5) against
//! candle's expression: `cargo run --release -p camelid-kernels --example exp_exhaustive`.
//! Prints, per path, how many results differ in any bit (NaN payloads included) and the
//! first few; exits with status 1 if any does. The suite's tests compare every 97th pattern;
//! this is the full comparison (about a minute per path on two cores).

use camelid_kernels::expf::{exp_in_place_on, silu_mul_on, ExpPath};
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

const CHUNK: u64 = 1 << 16;

fn main() {
    let mut differing = 0u64;
    for path in ExpPath::available() {
        if path == ExpPath::Scalar {
            continue;
        }
        let start = Instant::now();
        let first = Mutex::new(Vec::new());
        let (exp_diff, silu_diff) = (0..(1u64 << 32) / CHUNK)
            .into_par_iter()
            .map(|c| {
                let xs: Vec<f32> = (c * CHUNK..(c + 1) * CHUNK)
                    .map(|b| f32::from_bits(b as u32))
                    .collect();
                let mut e = xs.clone();
                exp_in_place_on(path, &mut e);
                let up = vec![1.5f32; xs.len()];
                let mut s = xs.clone();
                silu_mul_on(path, &mut s, &up);
                let (mut de, mut ds) = (0u64, 0u64);
                for ((&x, &e), &s) in xs.iter().zip(&e).zip(&s) {
                    let x = black_box(x);
                    let want_e = x.exp();
                    let want_s = x / (1.0 + (-x).exp()) * 1.5;
                    if e.to_bits() != want_e.to_bits() {
                        de += 1;
                        let mut f = first.lock().expect("lock");
                        if f.len() < 8 {
                            f.push(format!(
                                "exp({:#010x}) = {e:e}, libm {want_e:e}",
                                x.to_bits()
                            ));
                        }
                    }
                    if s.to_bits() != want_s.to_bits() {
                        ds += 1;
                        let mut f = first.lock().expect("lock");
                        if f.len() < 8 {
                            f.push(format!(
                                "silu({:#010x}) = {s:e}, scalar {want_s:e}",
                                x.to_bits()
                            ));
                        }
                    }
                }
                (de, ds)
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        println!(
            "{path:?}: 4294967296 arguments, exp differs on {exp_diff}, silu·u on {silu_diff} ({:.1} s)",
            start.elapsed().as_secs_f64()
        );
        for line in first.into_inner().expect("lock") {
            println!("  {line}");
        }
        differing += exp_diff + silu_diff;
    }
    if differing > 0 {
        std::process::exit(1);
    }
}
