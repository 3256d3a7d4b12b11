//! In-cache throughput of the packed products on one core, in multiply-adds per second and per
//! cycle: SmolLM2-135M's MLP shapes (`Q4_1` 1536 × 576 and 576 × 1536) and a `Q8_0` 1536 × 576
//! matrix (the head's type and width), each against 1, 8 and 32 tokens (or the counts given), repeated on the same
//! matrix so its weights stay in L2:
//! `cargo run --release -p camelid-kernels --example tile_products [REPS] [TOKENS...]`.
//! Times are the thread's CPU time; cycles come from a chain of dependent integer additions
//! (one per cycle) timed the same way, so MAC/cycle holds on a shared machine.

mod common;

use camelid_kernels::{matmul_group, quantize_weights, QMatrix, QType};
use common::Lcg;

fn thread_seconds() -> f64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Core cycles per second, from 400 million dependent additions.
fn cycles_per_second() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        let n: u64 = 100_000_000;
        let start = thread_seconds();
        let mut x = 0u64;
        // SAFETY: register arithmetic only.
        unsafe {
            std::arch::asm!(
                "2:",
                "add {x}, 1",
                "add {x}, 1",
                "add {x}, 1",
                "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) n => _,
            );
        }
        let s = thread_seconds() - start;
        assert_eq!(x, 4 * n);
        (4 * n) as f64 / s
    }
    #[cfg(not(target_arch = "x86_64"))]
    f64::NAN
}

fn main() {
    let args = common::numeric_args();
    let reps = args.first().copied().unwrap_or(200);
    let counts = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![1, 8, 32]
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a thread pool");
    let mut lcg = Lcg::new(1);
    let mut rnd = |n: usize| lcg.values(n);
    let hz = pool.install(cycles_per_second);
    println!("core clock {:.2} GHz", hz * 1e-9);
    for (ty, rows, cols) in [
        (QType::Q4_1, 1536, 576),
        (QType::Q4_1, 576, 1536),
        (QType::Q8_0, 1536, 576),
    ] {
        let w = quantize_weights(ty, &rnd(rows * cols));
        let m = QMatrix::from_bytes(ty, rows, cols, &w).expect("valid shapes");
        for &tokens in &counts {
            let x = rnd(tokens * cols);
            let mut out = vec![0f32; tokens * rows];
            let n = (reps * 32 / tokens).max(1);
            let secs = pool.install(|| {
                matmul_group(&[&m], &x, tokens, &mut [&mut out]).expect("shapes");
                let start = thread_seconds();
                for _ in 0..n {
                    matmul_group(&[&m], &x, tokens, &mut [&mut out]).expect("shapes");
                }
                thread_seconds() - start
            });
            let macs = (rows * cols * tokens * n) as f64;
            println!(
                "{ty:?} {rows}x{cols} packed={} {tokens:2} tokens: {:6.1} GMAC/s {:5.1} MAC/cycle (check {:.4})",
                m.is_packed(),
                macs / secs * 1e-9,
                macs / secs / hz,
                out[7]
            );
        }
    }
}
