//! `Q4_1` weights (`w = d·q + m`, q ∈ 0..15) against `Q8_1` activations
//! (`a = d·q`, q ∈ -127..127, `s = d·Σq`): `Σ w·a = d_w·d_a·Σ q_w·q_a + m_w·s_a`.

use crate::Isa;
use half::f16;

pub const QK: usize = 32;

/// ggml's `block_q4_1`, 20 bytes: fp16 scale, fp16 minimum, 32 nibbles (low nibbles are values
/// 0..15, high nibbles values 16..31).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; QK / 2],
}

/// ggml's `block_q8_1`, 36 bytes: fp16 scale, fp16 `d·Σq`, 32 signed bytes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8_1 {
    pub d: u16,
    pub s: u16,
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

fn h(x: u16) -> f32 {
    f16::from_bits(x).to_f32()
}

pub fn blocks_from_bytes(bytes: &[u8]) -> Vec<BlockQ4_1> {
    bytes
        .chunks_exact(20)
        .map(|b| {
            let mut qs = [0u8; 16];
            qs.copy_from_slice(&b[4..20]);
            BlockQ4_1 {
                d: u16::from_le_bytes([b[0], b[1]]),
                m: u16::from_le_bytes([b[2], b[3]]),
                qs,
            }
        })
        .collect()
}

/// Quantizes one activation row (length a multiple of 32) exactly as ggml's x86 path does:
/// scale `127 / max|x|`, round half to even, `s = fp16(d · Σq)` with `d` in f32.
pub fn quantize_q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
    x.chunks_exact(QK)
        .map(|v| {
            let amax = v.iter().fold(0f32, |m, &a| m.max(a.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut qs = [0i8; QK];
            let mut sum = 0i32;
            for (q, &a) in qs.iter_mut().zip(v) {
                let r = (a * id).round_ties_even() as i32;
                *q = r as i8;
                sum += r;
            }
            BlockQ8_1 {
                d: f16::from_f32(d).to_bits(),
                s: f16::from_f32(d * sum as f32).to_bits(),
                qs,
            }
        })
        .collect()
}

pub fn dot(isa: Isa, w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only set after run-time detection of avx2, fma and f16c.
        Isa::Avx2 => unsafe { dot_avx2(w, a) },
        _ => dot_scalar(w, a),
    }
}

pub fn dot_scalar(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    let mut mins = 0f32;
    for (bw, ba) in w.iter().zip(a) {
        let mut si = 0i32;
        for j in 0..QK / 2 {
            si += (bw.qs[j] & 0x0F) as i32 * ba.qs[j] as i32;
            si += (bw.qs[j] >> 4) as i32 * ba.qs[j + QK / 2] as i32;
        }
        sum += si as f32 * (h(bw.d) * h(ba.d));
        mins += h(bw.m) * h(ba.s);
    }
    sum + mins
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    use std::arch::x86_64::*;
    let low_nibbles = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // The f16c instruction, inlined; `half`'s conversion is an out-of-line call here.
    #[inline(always)]
    unsafe fn h(x: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x as i32)))
    }
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (bw, ba) in w.iter().zip(a) {
        mins += h(bw.m) * h(ba.s);
        let scale = _mm256_set1_ps(h(bw.d) * h(ba.d));
        // 16 bytes of nibbles → 32 bytes 0..15: low nibbles in the low lane, high in the high.
        let packed = _mm_loadu_si128(bw.qs.as_ptr() as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let qw = _mm256_and_si256(both, low_nibbles);
        let qa = _mm256_loadu_si256(ba.qs.as_ptr() as *const __m256i);
        // u8×i8 pairs → i16 (|15·127·2| fits), pairs → i32, → f32.
        let pairs = _mm256_maddubs_epi16(qw, qa);
        let quads = _mm256_madd_epi16(pairs, ones);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(quads), acc);
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let mut s = _mm_add_ps(hi, _mm256_castps256_ps128(acc));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s) + mins
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Isa, Q4_1Matrix};

    /// Quantizes f32 rows to Q4_1 like ggml's reference quantizer, for test data.
    fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in x.chunks_exact(QK) {
            let min = v.iter().copied().fold(f32::INFINITY, f32::min);
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
            for j in 0..QK / 2 {
                let lo = (((v[j] - min) * id + 0.5) as u8).min(15);
                let hi = (((v[j + QK / 2] - min) * id + 0.5) as u8).min(15);
                out.push(lo | (hi << 4));
            }
        }
        out
    }

    fn dequantize(b: &BlockQ4_1) -> [f64; QK] {
        let mut v = [0f64; QK];
        for j in 0..QK / 2 {
            v[j] = (b.qs[j] & 15) as f64 * h(b.d) as f64 + h(b.m) as f64;
            v[j + 16] = (b.qs[j] >> 4) as f64 * h(b.d) as f64 + h(b.m) as f64;
        }
        v
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_path_matches_an_f64_reference() {
        let (rows, cols, tokens) = (37, 256, 3);
        let w = pseudo_random(rows * cols, 1);
        let x = pseudo_random(tokens * cols, 2);
        let bytes = quantize_q4_1(&w);
        let blocks = blocks_from_bytes(&bytes);
        let mut paths = vec![Isa::Scalar];
        if Isa::detect() == Isa::Avx2 {
            paths.push(Isa::Avx2);
        }
        for isa in paths {
            let m = Q4_1Matrix::from_bytes(rows, cols, &bytes)
                .unwrap()
                .with_isa(isa);
            assert_eq!(m.isa(), isa);
            let mut out = vec![0f32; tokens * rows];
            m.matmul(&x, tokens, &mut out).unwrap();
            for t in 0..tokens {
                for r in 0..rows {
                    // Exact product of the dequantized weights with the unquantized input:
                    // the only error left is the activations' 8-bit rounding.
                    let mut want = 0f64;
                    for (b, blk) in blocks[r * cols / QK..(r + 1) * cols / QK]
                        .iter()
                        .enumerate()
                    {
                        let wv = dequantize(blk);
                        for j in 0..QK {
                            want += wv[j] * x[t * cols + b * QK + j] as f64;
                        }
                    }
                    let got = out[t * rows + r] as f64;
                    let scale = (0..cols).map(|c| x[t * cols + c].abs() as f64).sum::<f64>();
                    assert!(
                        (got - want).abs() <= 2e-3 * scale,
                        "{isa:?} t{t} r{r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_agree_closely() {
        if Isa::detect() != Isa::Avx2 {
            return;
        }
        let w = blocks_from_bytes(&quantize_q4_1(&pseudo_random(4096, 3)));
        let a = quantize_q8_1(&pseudo_random(4096, 4));
        let (s, v) = (dot(Isa::Scalar, &w, &a), dot(Isa::Avx2, &w, &a));
        assert!((s - v).abs() <= 1e-4 * s.abs().max(1.0), "{s} vs {v}");
    }

    #[test]
    fn q8_1_rounds_half_to_even_and_keeps_the_sum() {
        // max 127 → id 1: 0.5 → 0, 1.5 → 2, -2.5 → -2.
        let mut x = vec![0f32; QK];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = -2.5;
        let b = quantize_q8_1(&x)[0];
        assert_eq!(&b.qs[..4], &[127, 0, 2, -2]);
        assert_eq!(h(b.s), 127.0);
        assert_eq!(h(b.d), 1.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q4_1Matrix::from_bytes(2, 30, &[0; 40]).is_err());
        assert!(Q4_1Matrix::from_bytes(2, 32, &[0; 39]).is_err());
        let m = Q4_1Matrix::from_bytes(2, 32, &[0; 40]).unwrap();
        assert!(m.matmul(&[0.0; 31], 1, &mut [0.0; 2]).is_err());
    }
}
