//! Row kernels of the batched CPU pass ([`crate::transformer::Transformer::forward_batch`] over
//! a paged pool): RMSNorm, the residual add fused with the next norm, SwiGLU's `silu(gate) ·
//! up`, and rotary applied while the projections' rows are laid out as attention reads them.
//! Each computes exactly what the candle ops it stands for compute (the same operations in the
//! same order, so the same bits: tested against them), but on plain row-major slices, without
//! a tensor per op, and in parallel over rows, where candle runs a decode step's few rows on
//! one thread.

use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread (a lone decode row).
const PAR_MIN: usize = 1 << 13;

/// Rows per task so that a task has at least [`PAR_MIN`]/2 elements.
fn min_rows(width: usize) -> usize {
    (PAR_MIN / 2).div_ceil(width.max(1))
}

fn parallel(elements: usize) -> bool {
    elements >= PAR_MIN && rayon::current_num_threads() > 1
}

/// Rows normed together: their sums of squares run as independent chains that overlap, where
/// one row's in-order sum is a chain of dependent additions.
const GROUP: usize = 8;

/// `candle_nn::ops::rms_norm` of a few rows (`x.len() / weight.len()`, at most [`GROUP`]):
/// `x / sqrt(mean(x²) + eps) · weight`, each row's squares summed in order from `-0.0` (what
/// `Iterator::sum` does, so the same bits).
fn rms_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    let rows = x.len() / n.max(1);
    let mut sums = [-0.0f32; GROUP];
    if rows == GROUP {
        let r: [&[f32]; GROUP] = std::array::from_fn(|i| &x[i * n..(i + 1) * n]);
        for j in 0..n {
            for (s, r) in sums.iter_mut().zip(&r) {
                *s += r[j] * r[j];
            }
        }
    } else {
        for (s, r) in sums.iter_mut().zip(x.chunks(n)) {
            *s = r.iter().map(|&v| v * v).sum::<f32>();
        }
    }
    for ((o, x), &sum2) in out.chunks_mut(n).zip(x.chunks(n)).zip(&sums) {
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(x).zip(weight) {
            *o = v / m * w;
        }
    }
}

/// Groups of rows per task so that a task has at least [`PAR_MIN`]/2 elements.
fn min_groups(width: usize) -> usize {
    min_rows(width).div_ceil(GROUP)
}

/// RMSNorm of each row of `x` (`[rows, weight.len()]`) into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    debug_assert!(x.len() == out.len() && x.len().is_multiple_of(n.max(1)));
    let g = GROUP * n.max(1);
    if parallel(x.len()) {
        out.par_chunks_mut(g)
            .zip(x.par_chunks(g))
            .with_min_len(min_groups(n))
            .for_each(|(o, x)| rms_rows(x, weight, eps, o));
    } else {
        for (o, x) in out.chunks_mut(g).zip(x.chunks(g)) {
            rms_rows(x, weight, eps, o);
        }
    }
}

/// The residual add then the next norm, one pass over the rows: `x ← x + a`, and `out` gets
/// the RMSNorm of the new `x`.
pub fn add_rms_norm(x: &mut [f32], a: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    debug_assert!(x.len() == a.len() && x.len() == out.len() && x.len().is_multiple_of(n.max(1)));
    let g = GROUP * n.max(1);
    let rows = |(x, a, o): (&mut [f32], &[f32], &mut [f32])| {
        for (x, &a) in x.iter_mut().zip(a) {
            *x += a;
        }
        rms_rows(x, weight, eps, o);
    };
    if parallel(x.len()) {
        x.par_chunks_mut(g)
            .zip(a.par_chunks(g))
            .zip(out.par_chunks_mut(g))
            .with_min_len(min_groups(n))
            .for_each(|((x, a), o)| rows((x, a, o)));
    } else {
        for ((x, a), o) in x.chunks_mut(g).zip(a.chunks(g)).zip(out.chunks_mut(g)) {
            rows((x, a, o));
        }
    }
}

/// `x ← x + a` (the residual add).
pub fn add(x: &mut [f32], a: &[f32]) {
    debug_assert_eq!(x.len(), a.len());
    const CHUNK: usize = PAR_MIN / 2;
    if parallel(x.len()) {
        x.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(x, a)| x.iter_mut().zip(a).for_each(|(x, &a)| *x += a));
    } else {
        x.iter_mut().zip(a).for_each(|(x, &a)| *x += a);
    }
}

/// SwiGLU's `silu(gate) · up` into `gate`: candle's `silu` (`v / (1 + e^(−v))`) then the
/// product, its `e^x` vectorized with `f32::exp`'s exact bits ([`camelid_kernels::expf`]).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    const CHUNK: usize = PAR_MIN / 2;
    let f = camelid_kernels::expf::silu_mul;
    if parallel(gate.len()) {
        gate.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(|(g, u)| f(g, u));
    } else {
        f(gate, up);
    }
}

/// Rotary position embedding as [`crate::rope::Rope`] applies it (`candle_nn`'s `rope` or,
/// interleaved, `rope_i`), on the first `dims` channels of each head; the others pass through.
#[derive(Clone, Copy)]
pub struct Rotary<'a> {
    /// `[rows, dims / 2]` each.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub dims: usize,
    pub interleaved: bool,
}

/// Heads of row-major projections, laid out head by head: `src` holds `rows` rows of
/// `stride` values, the heads' `heads · head_dim` columns starting at column `at`; `dst` gets
/// `[heads, rows, head_dim]`, rotated when `rotary` is given.
pub fn heads_major(
    src: &[f32],
    stride: usize,
    at: usize,
    heads: usize,
    head_dim: usize,
    rotary: Option<Rotary>,
    dst: &mut [f32],
) {
    let rows = dst.len() / (heads * head_dim).max(1);
    let head = |h: usize, dst: &mut [f32]| {
        for (r, d) in dst.chunks_mut(head_dim).enumerate() {
            let s = &src[r * stride + at + h * head_dim..][..head_dim];
            match rotary {
                Some(rot) => rotate(s, r, rot, d),
                None => d.copy_from_slice(s),
            }
        }
    };
    let per_head = rows * head_dim;
    if parallel(dst.len()) && heads > 1 {
        dst.par_chunks_mut(per_head)
            .enumerate()
            .for_each(|(h, d)| head(h, d));
    } else {
        for (h, d) in dst.chunks_mut(per_head).enumerate() {
            head(h, d);
        }
    }
}

/// One head of one row (position table row `r`).
fn rotate(s: &[f32], r: usize, rot: Rotary, d: &mut [f32]) {
    let half = rot.dims / 2;
    let cos = &rot.cos[r * half..][..half];
    let sin = &rot.sin[r * half..][..half];
    if rot.interleaved {
        for i in 0..half {
            let (x1, x2) = (s[2 * i], s[2 * i + 1]);
            d[2 * i] = x1 * cos[i] - x2 * sin[i];
            d[2 * i + 1] = x1 * sin[i] + x2 * cos[i];
        }
    } else {
        for i in 0..half {
            let (x1, x2) = (s[i], s[i + half]);
            d[i] = x1 * cos[i] - x2 * sin[i];
            d[i + half] = x1 * sin[i] + x2 * cos[i];
        }
    }
    d[rot.dims..].copy_from_slice(&s[rot.dims..]);
}

#[cfg(test)]
mod tests {
    //! Each kernel against the candle ops it stands for, bit for bit, on sizes either side of
    //! the parallel threshold.
    use super::*;
    use crate::rope::Rope;
    use crate::spec::{RopeScaling, RotarySpec};
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // Deterministic values of mixed sign and magnitude (|v| up to ~8).
        (0..n)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 16.0
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn tensor_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .expect("flatten")
            .to_vec1::<f32>()
            .expect("vec")
    }

    const ROWS: [usize; 4] = [1, 3, 32, 70];

    #[test]
    fn rms_norm_and_residual_match_candle_bit_for_bit() {
        let dev = Device::Cpu;
        for &rows in &ROWS {
            for &n in &[576usize, 64, 5] {
                let x = values(rows * n, 1);
                let a = values(rows * n, 2);
                let w = values(n, 3);
                let xt = Tensor::from_vec(x.clone(), (1, rows, n), &dev).expect("x");
                let at = Tensor::from_vec(a.clone(), (1, rows, n), &dev).expect("a");
                let wt = Tensor::from_vec(w.clone(), n, &dev).expect("w");
                let expect = candle_nn::ops::rms_norm(&xt, &wt, 1e-5).expect("rms");
                let mut out = vec![0f32; rows * n];
                rms_norm(&x, &w, 1e-5, &mut out);
                assert_eq!(bits(&out), bits(&tensor_vec(&expect)), "rms {rows}x{n}");

                let h = (&xt + &at).expect("add");
                let expect = candle_nn::ops::rms_norm(&h, &wt, 1e-5).expect("rms");
                let mut xs = x.clone();
                add_rms_norm(&mut xs, &a, &w, 1e-5, &mut out);
                assert_eq!(bits(&xs), bits(&tensor_vec(&h)), "add {rows}x{n}");
                assert_eq!(bits(&out), bits(&tensor_vec(&expect)), "add+rms {rows}x{n}");

                let mut xs = x.clone();
                add(&mut xs, &a);
                assert_eq!(bits(&xs), bits(&tensor_vec(&h)), "add {rows}x{n}");
            }
        }
    }

    /// The bits of candle's `silu(gate) · up`.
    fn candle_silu_mul(gate: &[f32], up: &[f32]) -> Vec<u32> {
        let dev = Device::Cpu;
        let gt = Tensor::from_slice(gate, gate.len(), &dev).expect("gate");
        let ut = Tensor::from_slice(up, up.len(), &dev).expect("up");
        let expect = (candle_nn::ops::silu(&gt).expect("silu") * ut).expect("mul");
        bits(&tensor_vec(&expect))
    }

    #[test]
    fn silu_mul_matches_candle_bit_for_bit() {
        for &rows in &ROWS {
            let n = 1536;
            let g = values(rows * n, 4);
            let u = values(rows * n, 5);
            let mut out = g.clone();
            silu_mul(&mut out, &u);
            assert_eq!(bits(&out), candle_silu_mul(&g, &u), "{rows} rows");
        }
    }

    /// Gates beyond the vector exponential's range (|v| ≥ 88, infinities, NaN) among
    /// ordinary ones, on every path the CPU has, against candle.
    #[test]
    fn silu_mul_matches_candle_on_extreme_gates() {
        use camelid_kernels::expf::{silu_mul_on, ExpPath};
        let n = 1000;
        let mut g = values(n, 7);
        let extreme = [
            88.0,
            -88.0,
            88.8,
            -104.0,
            -103.5,
            1e4,
            -1e4,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            -0.0,
        ];
        for (i, &e) in extreme.iter().enumerate() {
            g[i * 37 + 5] = e;
        }
        let u = values(n, 8);
        let expect = candle_silu_mul(&g, &u);
        for path in ExpPath::available() {
            let mut out = g.clone();
            silu_mul_on(path, &mut out, &u);
            assert_eq!(bits(&out), expect, "{path:?}");
        }
        let mut out = g.clone();
        silu_mul(&mut out, &u);
        assert_eq!(bits(&out), expect, "chosen path");
    }

    /// Rotary on the heads of a row-major projection against `Rope::apply` on the same heads
    /// laid out `[1, heads, rows, head_dim]` by candle (whole and partial rotary, interleaved
    /// or not), and plain copies without rotary.
    #[test]
    fn heads_major_matches_candle_rope_bit_for_bit() {
        let dev = Device::Cpu;
        for &rows in &ROWS {
            for (head_dim, dims, interleaved) in [(64, 64, false), (64, 64, true), (32, 16, false)]
            {
                let spec = RotarySpec {
                    theta: 10_000.0,
                    scaling: RopeScaling::None,
                    interleaved,
                    fraction: dims as f64 / head_dim as f64,
                };
                let rope = Rope::new(&spec, dims);
                let (heads, skip) = (9, 3);
                // Columns: `skip` heads of something else, then the heads wanted, then more.
                let stride = (skip + heads + 2) * head_dim;
                let src = values(rows * stride, 6);
                let (cos, sin) = rope.cos_sin(7, rows, &dev).expect("cos/sin");
                let full = Tensor::from_vec(src.clone(), (1, rows, stride), &dev).expect("src");
                let q = full
                    .narrow(2, skip * head_dim, heads * head_dim)
                    .and_then(|q| q.reshape((1, rows, heads, head_dim)))
                    .and_then(|q| q.transpose(1, 2))
                    .and_then(|q| q.contiguous())
                    .expect("q");
                let expect = rope.apply(&q, &cos, &sin).expect("rope");
                let (cv, sv) = (tensor_vec(&cos), tensor_vec(&sin));
                let mut dst = vec![0f32; rows * heads * head_dim];
                let rot = Rotary {
                    cos: &cv,
                    sin: &sv,
                    dims,
                    interleaved,
                };
                heads_major(
                    &src,
                    stride,
                    skip * head_dim,
                    heads,
                    head_dim,
                    Some(rot),
                    &mut dst,
                );
                assert_eq!(
                    bits(&dst),
                    bits(&tensor_vec(&expect)),
                    "{rows} rows, head {head_dim}, rotating {dims}, interleaved {interleaved}"
                );
                heads_major(
                    &src,
                    stride,
                    skip * head_dim,
                    heads,
                    head_dim,
                    None,
                    &mut dst,
                );
                assert_eq!(bits(&dst), bits(&tensor_vec(&q)), "copy, {rows} rows");
            }
        }
    }
}
