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
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(v, 1);
    let mut s = _mm_add_ps(hi, _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
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

/// One block of one weight row against `NT` tokens; `k` is the block's index. `acc` gets the
/// scaled integer sums, `mins` (Q4_1) the `m·s` terms. A macro so that it is always inlined
/// with `ty` constant.
macro_rules! block {
    ($ty:expr, $p:expr, $a:expr, $k:expr, $acc:expr, $mins:expr, $idot:ident) => {{
        let p: *const u8 = $p;
        let dw = f16_at(p);
        // Unsigned operand and the sign to move onto the activations (ggml's trick).
        let (u, signs, mw) = match $ty {
            0 => {
                let qs = _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8));
                (_mm256_sign_epi8(qs, qs), qs, 0.0)
            }
            1 => (nibbles(p.add(4)), _mm256_setzero_si256(), f16_at(p.add(2))),
            _ => {
                let qs = _mm256_loadu_si256(p.add(2) as *const __m256i);
                (_mm256_sign_epi8(qs, qs), qs, 0.0)
            }
        };
        for t in 0..NT {
            let ab = $a[t].get_unchecked($k);
            let mut qa = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            if $ty == 1 {
                $mins[t] += mw * ab.s;
            } else {
                qa = _mm256_sign_epi8(qa, signs);
            }
            let prod = $idot(u, qa);
            $acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab.d), _mm256_cvtepi32_ps(prod), $acc[t]);
        }
    }};
}

/// One weight row against `NT` tokens. `ty`: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0; `bytes` per block.
macro_rules! row {
    ($ty:expr, $bytes:expr, $w:expr, $a:expr, $idot:ident) => {{
        let (w, a): (&[u8], [&[ActBlock]; NT]) = ($w, $a);
        let nb = w.len() / $bytes;
        let p = w.as_ptr();
        // Two independent accumulator sets, so consecutive blocks do not wait on each other's
        // FMA latency.
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); NT], [_mm256_setzero_ps(); NT]);
        let (mut mins0, mut mins1) = ([0f32; NT], [0f32; NT]);
        let mut k = 0;
        while k + 1 < nb {
            block!($ty, p.add(k * $bytes), a, k, acc0, mins0, $idot);
            block!($ty, p.add((k + 1) * $bytes), a, k + 1, acc1, mins1, $idot);
            k += 2;
        }
        if k < nb {
            block!($ty, p.add(k * $bytes), a, k, acc0, mins0, $idot);
        }
        let mut out = [0f32; NT];
        for t in 0..NT {
            out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t])) + (mins0[t] + mins1[t]);
        }
        out
    }};
}

macro_rules! kernels {
    ($module:ident, $features:literal, $idot:ident) => {
        pub mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            pub unsafe fn q4_0<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                row!(0, 18, w, a, $idot)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q4_1<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                row!(1, 20, w, a, $idot)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q8_0<const NT: usize>(w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
                row!(2, 34, w, a, $idot)
            }
        }
    };
}

/// Σ over 4-byte groups of u8 × i8, as eight i32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn idot_avx2(u: __m256i, s: __m256i) -> __m256i {
    // u ≤ 127 (|w|) or ≤ 15 (nibbles), |s| ≤ 127: pair sums fit in i16 without saturating.
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn idot_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

kernels!(avx2, "avx2,fma,f16c", idot_avx2);
kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", idot_vnni);

const _: () = assert!(std::mem::size_of::<ActBlock>() == 8 + QK);
