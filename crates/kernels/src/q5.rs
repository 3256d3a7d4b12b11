//! GGUF `Q5_0` and `Q5_1` (32 values a block) against 8-bit activations, as ggml computes them:
//! `Q5_0` with `Q8_0` activations (`w = d·(q − 16)`), `Q5_1` with `Q8_1` (`w = d·q + m`, the
//! `m·s` terms summed apart). Per block: the integer sum of `q·a` in 8 lanes, scaled by
//! `fp16(d)·d_a` into 8 f32 lanes, one horizontal sum per row (ggml's AVX2 order).
//!
//! Blocks: `Q5_0` 22 bytes (fp16 `d`, 32 fifth bits, 16 bytes of nibbles), `Q5_1` 24 bytes
//! (fp16 `d`, fp16 `m`, the bits, the nibbles); value `j < 16` is the low nibble of byte `j`,
//! value `16 + j` its high nibble, and bit `j` of the 32-bit field is value `j`'s fifth bit.

use crate::quant::{h, ActBlock, QK};

/// The unsigned 5-bit quants (0..31) of one block; `qh_at` is where the fifth bits start.
fn quants(b: &[u8], qh_at: usize) -> [u8; QK] {
    let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
    let qs = &b[qh_at + 4..qh_at + 20];
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 15) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// Scalar dot product of one row (`fifth_min`: `Q5_1`) with one activation row.
pub fn dot_scalar(q5_1: bool, w: &[u8], a: &[ActBlock]) -> f32 {
    let bb = if q5_1 { 24 } else { 22 };
    let (mut sum, mut mins) = (0f32, 0f32);
    for (b, ab) in w.chunks_exact(bb).zip(a) {
        let q = quants(b, if q5_1 { 4 } else { 2 });
        let off = if q5_1 { 0 } else { 16 };
        let s: i32 = q
            .iter()
            .zip(&ab.qs)
            .map(|(&q, &a)| (q as i32 - off) * a as i32)
            .sum();
        sum += s as f32 * (h(b) * ab.d);
        if q5_1 {
            mins += h(&b[2..]) * ab.s;
        }
    }
    sum + mins
}

/// Dequantizes one block to f64 (tests' reference), as ggml's `dequantize_row_q5_*`.
pub fn dequantize_block(q5_1: bool, b: &[u8]) -> [f64; QK] {
    let q = quants(b, if q5_1 { 4 } else { 2 });
    let d = h(b) as f64;
    let mut v = [0f64; QK];
    for (x, &q) in v.iter_mut().zip(&q) {
        *x = if q5_1 {
            d * q as f64 + h(&b[2..]) as f64
        } else {
            d * (q as f64 - 16.0)
        };
    }
    v
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! One row against `NT` tokens, for AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI
    //! (`vpdpbusd`): the same integer sums.
    #![allow(clippy::missing_safety_doc)]

    use crate::quant::ActBlock;
    use crate::simd::{f16_at, hsum, idot_avx2, idot_vnni};
    use std::arch::x86_64::*;

    /// 32 bits → 32 bytes, 0xFF where the bit is set (ggml's `bytes_from_bits_32`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
        let x = std::ptr::read_unaligned(p as *const i32);
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// 16 bytes of nibbles → 32 bytes 0..15, low nibbles first.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let packed = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    macro_rules! kernels {
        ($module:ident, $features:literal, $idot:ident) => {
            pub mod $module {
                use super::*;

                /// `Q5_0`: the signed quants `q − 16` (ggml: nibble | ¬bit·0xF0), sign trick.
                #[target_feature(enable = $features)]
                pub unsafe fn q5_0<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                    let nb = w.len() / 22;
                    let mut acc = [_mm256_setzero_ps(); NT];
                    for k in 0..nb {
                        let p = w.as_ptr().add(k * 22);
                        let dw = f16_at(p);
                        let hi =
                            _mm256_andnot_si256(bytes_from_bits(p.add(2)), _mm256_set1_epi8(-16));
                        let q = _mm256_or_si256(nibbles(p.add(6)), hi);
                        let u = _mm256_sign_epi8(q, q);
                        for t in 0..NT {
                            let ab = a[t].get_unchecked(k);
                            let qa = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                            let prod = $idot(u, _mm256_sign_epi8(qa, q));
                            let d = _mm256_set1_ps(dw * ab.d);
                            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(prod), acc[t]);
                        }
                    }
                    let mut out = [0f32; NT];
                    for t in 0..NT {
                        out[t] = hsum(acc[t]);
                    }
                    out
                }

                /// `Q5_1`: unsigned quants 0..31, `m·s` summed apart.
                #[target_feature(enable = $features)]
                pub unsafe fn q5_1<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                    let nb = w.len() / 24;
                    let mut acc = [_mm256_setzero_ps(); NT];
                    let mut mins = [0f32; NT];
                    for k in 0..nb {
                        let p = w.as_ptr().add(k * 24);
                        let (dw, mw) = (f16_at(p), f16_at(p.add(2)));
                        let hi =
                            _mm256_and_si256(bytes_from_bits(p.add(4)), _mm256_set1_epi8(0x10));
                        let u = _mm256_or_si256(nibbles(p.add(8)), hi);
                        for t in 0..NT {
                            let ab = a[t].get_unchecked(k);
                            let qa = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                            mins[t] += mw * ab.s;
                            let d = _mm256_set1_ps(dw * ab.d);
                            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps($idot(u, qa)), acc[t]);
                        }
                    }
                    let mut out = [0f32; NT];
                    for t in 0..NT {
                        out[t] = hsum(acc[t]) + mins[t];
                    }
                    out
                }
            }
        };
    }

    // u ≤ 31 here: `idot_avx2`'s pair sums fit in i16.
    kernels!(avx2, "avx2,fma,f16c", idot_avx2);
    kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", idot_vnni);
}
