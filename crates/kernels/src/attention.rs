//! Scaled dot-product attention of one sequence on the CPU, one query row at a time: the
//! scores of a row live in a buffer of the keys' length, so a prefill never materializes the
//! `[heads, new, total]` score tensor (nor its mask and softmax copies), and causal rows
//! compute only the keys they see. Keys and values are read in place from a cache whose heads
//! may be strided (a preallocated buffer longer than the sequence).

use rayon::prelude::*;
use std::cell::RefCell;

/// Keys or values `[kv_heads, len, head_dim]`: rows of a head contiguous, heads
/// `head_stride` values apart.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub head_stride: usize,
}

/// The shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// New tokens (query rows).
    pub new: usize,
    /// Keys in total (when causal, the new tokens' are the last).
    pub total: usize,
    pub scale: f32,
    /// New token `i` sees keys `..total - new + i + 1`; otherwise every key.
    pub causal: bool,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Query rows per task.
const ROWS_PER_TASK: usize = 16;

/// `q` is `[heads, new, head_dim]`; writes `out` as `[new, heads · head_dim]` (the layout the
/// output projection reads).
pub fn attention(
    q: &[f32],
    k: HeadRows,
    v: HeadRows,
    shape: AttentionShape,
    out: &mut [f32],
) -> Result<(), crate::KernelError> {
    attention_on(crate::Isa::detect(), q, k, v, shape, out)
}

/// [`attention`] on a given instruction set (tests run every one this CPU has).
fn attention_on(
    isa: crate::Isa,
    q: &[f32],
    k: HeadRows,
    v: HeadRows,
    shape: AttentionShape,
    out: &mut [f32],
) -> Result<(), crate::KernelError> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        new,
        total,
        causal,
        ..
    } = shape;
    let bad = |what: &str| Err(crate::KernelError(format!("attention: {what} ({shape:?})")));
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || causal && new > total {
        return bad("head counts or lengths do not fit");
    }
    if q.len() != heads * new * hd || out.len() != new * heads * hd {
        return bad("query or output length");
    }
    for kv in [k, v] {
        if total > 0 && kv.data.len() < (kv_heads - 1) * kv.head_stride + total * hd {
            return bad("keys or values shorter than their heads");
        }
    }
    let dst = crate::SharedOut(out.as_mut_ptr());
    let blocks = new.div_ceil(ROWS_PER_TASK);
    let work = |unit: usize| {
        let (h, b) = (unit / blocks, unit % blocks);
        let rows = b * ROWS_PER_TASK..((b + 1) * ROWS_PER_TASK).min(new);
        SCORES.with(|s| {
            let mut scores = s.borrow_mut();
            scores.resize(total, 0.0);
            run(isa, q, k, v, &shape, h, rows, &mut scores, dst);
        });
    };
    let units = heads * blocks;
    if rayon::current_num_threads() == 1 || new * total * heads < 16384 {
        (0..units).for_each(work);
    } else {
        (0..units).into_par_iter().for_each(work);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    isa: crate::Isa,
    q: &[f32],
    k: HeadRows,
    v: HeadRows,
    shape: &AttentionShape,
    h: usize,
    rows: std::ops::Range<usize>,
    scores: &mut [f32],
    dst: crate::SharedOut,
) {
    #[cfg(target_arch = "x86_64")]
    if isa != crate::Isa::Scalar {
        // SAFETY: `isa` is a set detected on this CPU, all of which have avx2 and fma.
        return unsafe { run_avx2(q, k, v, shape, h, rows, scores, dst) };
    }
    run_impl(q, k, v, shape, h, rows, scores, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_avx2(
    q: &[f32],
    k: HeadRows,
    v: HeadRows,
    shape: &AttentionShape,
    h: usize,
    rows: std::ops::Range<usize>,
    scores: &mut [f32],
    dst: crate::SharedOut,
) {
    match shape.head_dim {
        64 => x86::run::<8>(q, k, v, shape, h, rows, scores, dst),
        128 => x86::run::<16>(q, k, v, shape, h, rows, scores, dst),
        // The generic code, vectorized by the compiler for these features.
        _ => run_impl(q, k, v, shape, h, rows, scores, dst),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{AttentionShape, HeadRows};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let mut s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `run_impl` for a head dimension of `8 · V`: the query row and the output row are held
    /// in registers, scores are computed 4 keys at a time (independent FMA chains).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run<const V: usize>(
        q: &[f32],
        k: HeadRows,
        v: HeadRows,
        shape: &AttentionShape,
        h: usize,
        rows: std::ops::Range<usize>,
        scores: &mut [f32],
        dst: crate::SharedOut,
    ) {
        let hd = 8 * V;
        let g = h / (shape.heads / shape.kv_heads);
        let keys = k.data[g * k.head_stride..].as_ptr();
        let values = v.data[g * v.head_stride..].as_ptr();
        for i in rows {
            let seen = if shape.causal {
                shape.total - shape.new + i + 1
            } else {
                shape.total
            };
            let qp = q.as_ptr().add((h * shape.new + i) * hd);
            let qv: [__m256; V] = std::array::from_fn(|d| _mm256_loadu_ps(qp.add(8 * d)));
            let mut max = f32::NEG_INFINITY;
            let mut j = 0;
            let scale = _mm_set1_ps(shape.scale);
            let mut max4 = _mm_set1_ps(f32::NEG_INFINITY);
            while j + 4 <= seen {
                // Two accumulators per key (even and odd 8-column pieces): 8 FMA chains.
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for (d, qv) in qv.iter().enumerate() {
                    for (n, a) in acc.iter_mut().enumerate() {
                        let kp = keys.add((j + n) * hd + 8 * d);
                        a[d % 2] = _mm256_fmadd_ps(*qv, _mm256_loadu_ps(kp), a[d % 2]);
                    }
                }
                let a: [__m256; 4] = std::array::from_fn(|n| _mm256_add_ps(acc[n][0], acc[n][1]));
                // The 4 keys' sums side by side in one vector.
                let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                let s4 = _mm_mul_ps(
                    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)),
                    scale,
                );
                _mm_storeu_ps(scores.as_mut_ptr().add(j), s4);
                max4 = _mm_max_ps(max4, s4);
                j += 4;
            }
            let mut m4 = [0f32; 4];
            _mm_storeu_ps(m4.as_mut_ptr(), max4);
            max = m4.iter().fold(max, |m, &x| m.max(x));
            while j < seen {
                let mut a = _mm256_setzero_ps();
                for (d, qv) in qv.iter().enumerate() {
                    a = _mm256_fmadd_ps(*qv, _mm256_loadu_ps(keys.add(j * hd + 8 * d)), a);
                }
                let s = hsum(a) * shape.scale;
                *scores.get_unchecked_mut(j) = s;
                max = max.max(s);
                j += 1;
            }
            let mut sum = 0f32;
            for s in &mut scores[..seen] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let mut acc = [_mm256_setzero_ps(); V];
            for (j, &p) in scores[..seen].iter().enumerate() {
                let p = _mm256_set1_ps(p);
                for (d, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(values.add(j * hd + 8 * d)), *a);
                }
            }
            let inv = _mm256_set1_ps(1.0 / sum);
            // Row `i` of head `h` is written by this task alone, in bounds (checked).
            let o = dst.0.add((i * shape.heads + h) * hd);
            for (d, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * d), _mm256_mul_ps(*a, inv));
            }
        }
    }
}

/// Query rows `rows` of head `h`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_impl(
    q: &[f32],
    k: HeadRows,
    v: HeadRows,
    shape: &AttentionShape,
    h: usize,
    rows: std::ops::Range<usize>,
    scores: &mut [f32],
    dst: crate::SharedOut,
) {
    let hd = shape.head_dim;
    let g = h / (shape.heads / shape.kv_heads);
    let keys = &k.data[g * k.head_stride..];
    let values = &v.data[g * v.head_stride..];
    let mut acc = [0f32; 256];
    for i in rows {
        let seen = if shape.causal {
            shape.total - shape.new + i + 1
        } else {
            shape.total
        };
        let qi = &q[(h * shape.new + i) * hd..(h * shape.new + i + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores[..seen].iter_mut().enumerate() {
            *s = dot(qi, &keys[j * hd..(j + 1) * hd]) * shape.scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in &mut scores[..seen] {
            *s = (*s - max).exp();
            sum += *s;
        }
        // SAFETY: row `i` of head `h` is written by this task alone, in bounds (checked).
        let o =
            unsafe { std::slice::from_raw_parts_mut(dst.0.add((i * shape.heads + h) * hd), hd) };
        if hd <= acc.len() {
            let a = &mut acc[..hd];
            a.fill(0.0);
            for (j, &p) in scores[..seen].iter().enumerate() {
                for (a, &x) in a.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                    *a += p * x;
                }
            }
            for (o, a) in o.iter_mut().zip(a.iter()) {
                *o = a / sum;
            }
        } else {
            o.fill(0.0);
            for (j, &p) in scores[..seen].iter().enumerate() {
                for (o, &x) in o.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                    *o += p * x;
                }
            }
            for o in o.iter_mut() {
                *o /= sum;
            }
        }
    }
}

/// A dot product in 8 partial sums (so that it vectorizes; the same order on every path).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            s[l] += x[l] * y[l];
        }
    }
    ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo_random;

    /// Against softmax(q·kᵀ·scale + mask)·v in f64, with grouped heads, keys in a strided
    /// buffer longer than the sequence, causal and not, prefill after cached tokens and decode.
    #[test]
    fn matches_an_f64_reference() {
        for (heads, kv_heads, hd, new, total, causal) in [
            (4, 2, 16, 5, 9, true),
            (6, 3, 20, 1, 7, true),
            (2, 1, 64, 40, 40, true),
            (3, 3, 8, 4, 6, false),
            (4, 1, 128, 6, 11, true),
            (2, 2, 64, 3, 3, false),
            // Cross-attention: more queries than keys.
            (2, 2, 8, 3, 2, false),
        ] {
            let cap = total + 3;
            let q = pseudo_random(heads * new * hd, 1);
            let k = pseudo_random(kv_heads * cap * hd, 2);
            let v = pseudo_random(kv_heads * cap * hd, 3);
            let scale = 1.0 / (hd as f32).sqrt();
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: hd,
                new,
                total,
                scale,
                causal,
            };
            let rows = |d| HeadRows {
                data: d,
                head_stride: cap * hd,
            };
            for isa in crate::Isa::available() {
                let mut out = vec![0f32; new * heads * hd];
                attention_on(isa, &q, rows(&k), rows(&v), shape, &mut out).unwrap();
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    for i in 0..new {
                        let seen = if causal { total - new + i + 1 } else { total };
                        let s: Vec<f64> = (0..seen)
                            .map(|j| {
                                (0..hd)
                                    .map(|d| {
                                        q[(h * new + i) * hd + d] as f64
                                            * k[(g * cap + j) * hd + d] as f64
                                    })
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..hd {
                            let want: f64 = (0..seen)
                                .map(|j| e[j] / z * v[(g * cap + j) * hd + d] as f64)
                                .sum();
                            let got = out[(i * heads + h) * hd + d] as f64;
                            assert!(
                                (got - want).abs() < 1e-5,
                                "{isa:?} {h} {i} {d}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let shape = AttentionShape {
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
            new: 1,
            total: 1,
            scale: 1.0,
            causal: true,
        };
        let rows = HeadRows {
            data: &[0.0; 8],
            head_stride: 4,
        };
        assert!(attention(&[0.0; 12], rows, rows, shape, &mut [0.0; 12]).is_err());
        let shape = AttentionShape { heads: 2, ..shape };
        assert!(attention(&[0.0; 8], rows, rows, shape, &mut [0.0; 8]).is_ok());
        let short = HeadRows {
            data: &[0.0; 7],
            head_stride: 4,
        };
        assert!(attention(&[0.0; 8], short, rows, shape, &mut [0.0; 8]).is_err());
    }
}
