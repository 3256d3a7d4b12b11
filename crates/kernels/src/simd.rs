//! x86-64 kernels: one weight row against a tile of `NT` activation rows, so each weight block
//! is loaded and unpacked once per tile (prefill uses tiles of 4 tokens, decode tiles of 1).
//!
//! The same code is generated twice by `kernels!`: for AVX2 (u8×i8 products through
//! `vpmaddubsw` + `vpmaddwd`) and for AVX-512 VNNI on 256-bit registers (`vpdpbusd`). Signed
//! weights use ggml's sign trick: `|w| · (a · sign(w))`, so the unsigned operand is `|w|`.

#![allow(clippy::missing_safety_doc)]

use crate::quant::{ActBlock, QK};
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let mut s = _mm_add_ps(hi, _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 bytes of nibbles → 32 bytes 0..15 (low nibbles first, as ggml orders them).
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

            #[target_feature(enable = $features)]
            pub unsafe fn q4_0<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                let nb = w.len() / 18;
                let mut acc = [[_mm256_setzero_ps(); NT]; 2];
                let eight = _mm256_set1_epi8(8);
                for b in 0..nb {
                    let p = w.as_ptr().add(b * 18);
                    let dw = f16_at(p);
                    let qs = _mm256_sub_epi8(nibbles(p.add(2)), eight);
                    let ax = _mm256_sign_epi8(qs, qs);
                    let acc = &mut acc[b & 1];
                    for t in 0..NT {
                        let ab = a[t].get_unchecked(b);
                        let qa = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                        let prod = $idot(ax, _mm256_sign_epi8(qa, qs));
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw * ab.d),
                            _mm256_cvtepi32_ps(prod),
                            acc[t],
                        );
                    }
                }
                let mut out = [0f32; NT];
                for t in 0..NT {
                    out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t]));
                }
                out
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q4_1<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                let nb = w.len() / 20;
                let mut acc = [[_mm256_setzero_ps(); NT]; 2];
                let mut mins = [0f32; NT];
                for b in 0..nb {
                    let p = w.as_ptr().add(b * 20);
                    let dw = f16_at(p);
                    let mw = f16_at(p.add(2));
                    let qw = nibbles(p.add(4));
                    let acc = &mut acc[b & 1];
                    for t in 0..NT {
                        let ab = a[t].get_unchecked(b);
                        mins[t] += mw * ab.s;
                        let qa = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                        let prod = $idot(qw, qa);
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw * ab.d),
                            _mm256_cvtepi32_ps(prod),
                            acc[t],
                        );
                    }
                }
                let mut out = [0f32; NT];
                for t in 0..NT {
                    out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t])) + mins[t];
                }
                out
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q8_0<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                let nb = w.len() / 34;
                let mut acc = [[_mm256_setzero_ps(); NT]; 2];
                for b in 0..nb {
                    let p = w.as_ptr().add(b * 34);
                    let dw = f16_at(p);
                    let qs = _mm256_loadu_si256(p.add(2) as *const __m256i);
                    let ax = _mm256_sign_epi8(qs, qs);
                    let acc = &mut acc[b & 1];
                    for t in 0..NT {
                        let ab = a[t].get_unchecked(b);
                        let qa = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                        let prod = $idot(ax, _mm256_sign_epi8(qa, qs));
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw * ab.d),
                            _mm256_cvtepi32_ps(prod),
                            acc[t],
                        );
                    }
                }
                let mut out = [0f32; NT];
                for t in 0..NT {
                    out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t]));
                }
                out
            }
        }
    };
}

/// Σ over 4-byte groups of u8 × i8, as eight i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn idot_avx2(u: __m256i, s: __m256i) -> __m256i {
    // u ≤ 127 (|w|) or ≤ 15 (nibbles), |s| ≤ 127: pair sums fit in i16 without saturating.
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
unsafe fn idot_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

kernels!(avx2, "avx2,fma,f16c", idot_avx2);
kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", idot_vnni);

const _: () = assert!(std::mem::size_of::<ActBlock>() == 8 + QK);
