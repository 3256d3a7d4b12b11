//! Block formats (ggml's, byte for byte), activation quantization and the scalar dot products.
//!
//! Weights: `Q4_0` (`w = d·(q − 8)`), `Q4_1` (`w = d·q + m`), `Q8_0` (`w = d·q`), 32 values a
//! block. Activations are quantized to 8 bits per 32 values as ggml's x86 path does for the
//! matching `vec_dot_type` (`Q8_0` for `Q4_0`/`Q8_0` weights, `Q8_1` for `Q4_1`): scale
//! `127 / max|x|`, round half to even, `d` stored as fp16, and for `Q8_1` also
//! `s = fp16(d · Σq)`. [`ActBlock`] keeps both already converted to f32 so the kernels read them
//! without conversion; the values are exactly the fp16 ones.

use half::f16;

pub const QK: usize = 32;

/// How a GGUF quantized weight type lays out one block of 32 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    /// 18 bytes: fp16 `d`, 16 bytes of nibbles; `w = d·(q − 8)`.
    Q4_0,
    /// 20 bytes: fp16 `d`, fp16 `m`, 16 bytes of nibbles; `w = d·q + m`.
    Q4_1,
    /// 34 bytes: fp16 `d`, 32 signed bytes; `w = d·q`.
    Q8_0,
}

impl QType {
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q8_0 => "Q8_0",
        }
    }
}

/// One quantized activation block: `a = d·q`, `s = fp16(d·Σq)` (used by `Q4_1` only).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(8))]
pub struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

impl Default for ActBlock {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }
    }
}

fn fp16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

pub fn h(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

#[inline(always)]
fn quantize_into_impl(x: &[f32], out: &mut [ActBlock]) {
    for (v, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = v.iter().fold(0f32, |m, &a| m.max(a.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &a) in blk.qs.iter_mut().zip(v) {
            let r = (a * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        blk.d = fp16_round(d);
        blk.s = fp16_round(d * sum as f32);
    }
}

/// [`quantize_into_impl`] in AVX2 registers, with the same results: the maximum is exact in
/// any order (a NaN is skipped as `f32::max` skips it), `d`, `1/d` and the fp16 roundings are
/// the same scalar operations, and the products are rounded half to even and summed as
/// integers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_into_avx2(x: &[f32], out: &mut [ActBlock]) {
    quantize_avx2(x, out, &mut [])
}

/// [`quantize_into_avx2`] that also writes each block's [`crate::packed::block_sums`] value
/// (`128·Σq`, from the same integer sum) into `sums`, when `sums` has a place for it. `d` and
/// `s` are rounded to fp16 by F16C's `vcvtps2ph` (round to nearest even) and back, the same
/// conversion as [`fp16_round`] without a call and a feature check per value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(x: &[f32], out: &mut [ActBlock], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    // `vpackssdw` + `vpacksswb` leave the 4-byte pieces in the order 0 4 1 5 2 6 3 7.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, (v, blk)) in x.chunks_exact(QK).zip(out.iter_mut()).enumerate() {
        let p = v.as_ptr();
        let a = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        // max(new, m): a NaN `new` keeps `m`.
        let mut m = _mm256_setzero_ps();
        for a in a {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, a), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        for (q, &a) in q.iter_mut().zip(&a) {
            let r = _mm256_mul_ps(a, id);
            *q = _mm256_cvtps_epi32(_mm256_round_ps(
                r,
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            ));
        }
        let s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(packed, order);
        _mm256_storeu_si256(blk.qs.as_mut_ptr() as *mut __m256i, bytes);
        let ds = _mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_setr_ps(
            d,
            d * sum as f32,
            0.0,
            0.0,
        )));
        blk.d = _mm_cvtss_f32(ds);
        blk.s = _mm_cvtss_f32(_mm_movehdup_ps(ds));
        if let Some(s) = sums.get_mut(b) {
            *s = 128 * sum;
        }
    }
}

/// [`quantize_avx2`] on AVX-512, 16 blocks at a time, with the same results: each block's
/// |x| maxima and integer sums stay 16-lane vectors (NaN skipped the same way), reduced for the
/// 16 blocks at once by one transposed tree, then the 16 blocks' `d = amax / 127`,
/// `1/d = 127 / amax`, `d·Σq` and their fp16 roundings are each one vector operation (the same
/// IEEE operations lane by lane as the scalar ones); the products are rounded half to even by
/// the conversion itself and saturated to bytes by `vpmovsdb` (the same saturation as
/// `vpackssdw` + `vpacksswb`), and the 16 sums are one masked store.
///
/// In the model much of its time is memory: the other core read the previous product's blocks
/// from these same lines, so each line written has to be taken back from it. `prefetchw` asks
/// for the next 16 blocks' lines while these 16 are computed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn quantize_avx512(x: &[f32], out: &mut [ActBlock], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    const G: usize = 16;
    let n = (x.len() / QK).min(out.len());
    let (xp, op, sp) = (x.as_ptr(), out.as_mut_ptr(), sums.as_mut_ptr());
    let (c127, zero) = (_mm512_set1_ps(127.0), _mm512_setzero_ps());
    let mut id = [0f32; G];
    // `across!(v, op, ..)`: lane `k` of the result is `op` over the 16 lanes of `v[k]`, as a
    // tree of 15 lane-wise operations on shuffled halves (max and wrapping add give the same
    // result in any order: the maxima are of non-NaN values).
    macro_rules! across {
        ($v:expr, $op:ident, $to:expr, $from:expr) => {{
            let op = |a: __m512i, b: __m512i| -> __m512i {
                match stringify!($op) {
                    "max" => _mm512_castps_si512(_mm512_max_ps(
                        _mm512_castsi512_ps(a),
                        _mm512_castsi512_ps(b),
                    )),
                    _ => _mm512_add_epi32(a, b),
                }
            };
            let v: [__m512i; G] = std::array::from_fn(|k| $to($v[k]));
            // Pairs of vectors: 32-bit halves of each 64 bits, then 64-bit halves of each 128
            // bits, leave vector j's four 128-bit partials in lane j % 4 of each 128 bits ...
            let t: [__m512i; 8] = std::array::from_fn(|j| {
                let (a, b) = (v[2 * j], v[2 * j + 1]);
                op(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
            });
            let u: [__m512i; 4] = std::array::from_fn(|j| {
                let (a, b) = (t[2 * j], t[2 * j + 1]);
                op(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
            });
            // ... then the four 128-bit partials of vectors 4j..4j + 4 are added across.
            let w: [__m512i; 2] = std::array::from_fn(|j| {
                let (a, b) = (u[2 * j], u[2 * j + 1]);
                op(
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
                )
            });
            let r = op(
                _mm512_shuffle_i32x4::<0b10_00_10_00>(w[0], w[1]),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(w[0], w[1]),
            );
            $from(r)
        }};
    }
    let mut g0 = 0;
    while g0 < n {
        let nb = G.min(n - g0);
        // The lines of the next 16 blocks and of their sums (a prefetch never faults).
        let next = op.wrapping_add(g0 + G) as *const i8;
        for line in 0..=G * std::mem::size_of::<ActBlock>() / 64 {
            prefetch_write(next.wrapping_add(line * 64));
        }
        prefetch_write(sp.wrapping_add(g0 + G) as *const i8);
        prefetch_write(sp.wrapping_add(g0 + 2 * G - 1) as *const i8);
        // Each block's |x| maxima in 16 lanes (zero past the last block).
        let mut m = [zero; G];
        for (k, m) in m.iter_mut().enumerate().take(nb) {
            let p = xp.add((g0 + k) * QK);
            let (a0, a1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            // max(new, m): a NaN `new` keeps `m` (never NaN itself).
            let v = _mm512_max_ps(_mm512_abs_ps(a0), zero);
            *m = _mm512_max_ps(_mm512_abs_ps(a1), v);
        }
        let am = across!(m, max, _mm512_castps_si512, _mm512_castsi512_ps);
        let d = _mm512_div_ps(am, c127);
        let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(am, zero);
        _mm512_storeu_ps(id.as_mut_ptr(), _mm512_maskz_div_ps(nonzero, c127, am));
        let mut q = [_mm512_setzero_si512(); G];
        for (k, q) in q.iter_mut().enumerate().take(nb) {
            let p = xp.add((g0 + k) * QK);
            let i = _mm512_set1_ps(id[k]);
            let q0 = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(_mm512_loadu_ps(p), i),
            );
            let q1 = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(_mm512_loadu_ps(p.add(16)), i),
            );
            let bytes = _mm256_set_m128i(_mm512_cvtsepi32_epi8(q1), _mm512_cvtsepi32_epi8(q0));
            _mm256_storeu_si256((*op.add(g0 + k)).qs.as_mut_ptr() as *mut __m256i, bytes);
            *q = _mm512_add_epi32(q0, q1);
        }
        let s = across!(q, add, |v| v, |v| v);
        let ds = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s));
        const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let d = _mm512_cvtph_ps(_mm512_cvtps_ph::<RN>(d));
        let ds = _mm512_cvtph_ps(_mm512_cvtps_ph::<RN>(ds));
        // (d, s) pairs, blocks 0..8 then 8..16, each pair one 8-byte store (`ActBlock` starts
        // with `d` then `s`); written out, not as a loop the compiler would turn into scatters.
        let lo = _mm512_permutex2var_ps(
            d,
            _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
            ds,
        );
        let hi = _mm512_permutex2var_ps(
            d,
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
            ds,
        );
        macro_rules! put {
            ($v:expr, $base:literal, $($lane:literal)*) => {$(
                let pair = _mm_castps_pd(_mm512_extractf32x4_ps::<$lane>($v));
                if $base + 2 * $lane < nb {
                    _mm_storel_pd(op.add(g0 + $base + 2 * $lane) as *mut f64, pair);
                }
                if $base + 2 * $lane + 1 < nb {
                    _mm_storeh_pd(op.add(g0 + $base + 2 * $lane + 1) as *mut f64, pair);
                }
            )*};
        }
        put!(lo, 0, 0 1 2 3);
        put!(hi, 8, 0 1 2 3);
        // `128·Σq` where `sums` has a place for it.
        let s128 = _mm512_slli_epi32::<7>(s);
        let ns = sums.len().saturating_sub(g0).min(nb);
        _mm512_mask_storeu_epi32(
            sp.wrapping_add(g0),
            (1u32 << ns).wrapping_sub(1) as u16,
            s128,
        );
        g0 += nb;
    }
}

/// `prefetchw`: asks for the line at `p` in a state it can be written in. A hint only (it
/// never faults, on any address; a CPU without it treats its encoding as a `nop`).
/// Written as assembly because the intrinsic emits it only with an unstable target feature.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_write(p: *const i8) {
    // SAFETY: a prefetch reads nothing architecturally and cannot fault.
    unsafe {
        std::arch::asm!("prefetchw byte ptr [{0}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
}

/// Quantizes `x` (a multiple of 32 values) into `out` (`x.len() / 32` blocks).
pub fn quantize_into(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() == crate::Isa::Avx512Vnni {
        // SAFETY: avx512f (with avx2, fma, f16c) was detected at run time.
        return unsafe { quantize_avx512(x, out, &mut []) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() != crate::Isa::Scalar {
        // SAFETY: avx2, fma and f16c were detected at run time.
        return unsafe { quantize_into_avx2(x, out) };
    }
    quantize_into_impl(x, out)
}

/// [`quantize_into`] and [`crate::packed::block_sums`] in one pass: `sums` (`out.len()`
/// values) gets the values `block_sums(out, ..)` gives.
pub fn quantize_with_sums(x: &[f32], out: &mut [ActBlock], sums: &mut [i32]) {
    assert_eq!(sums.len(), out.len(), "one sum per block");
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() == crate::Isa::Avx512Vnni {
        // SAFETY: avx512f (with avx2, fma, f16c) was detected at run time.
        return unsafe { quantize_avx512(x, out, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::detect() != crate::Isa::Scalar {
        // SAFETY: avx2, fma and f16c were detected at run time.
        return unsafe { quantize_avx2(x, out, sums) };
    }
    quantize_into_impl(x, out);
    for (s, a) in sums.iter_mut().zip(out.iter()) {
        *s = 128 * a.qs.iter().map(|&q| q as i32).sum::<i32>();
    }
}

/// Scalar dot product of one weight row (raw blocks) with one activation row.
pub fn dot_scalar(ty: QType, w: &[u8], a: &[ActBlock]) -> f32 {
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (blk, ab) in w.chunks_exact(bb).zip(a) {
        let d = h(blk);
        match ty {
            QType::Q4_0 => {
                let mut si = 0i32;
                for j in 0..QK / 2 {
                    si += ((blk[2 + j] & 0x0F) as i32 - 8) * ab.qs[j] as i32;
                    si += ((blk[2 + j] >> 4) as i32 - 8) * ab.qs[j + QK / 2] as i32;
                }
                sum += si as f32 * (d * ab.d);
            }
            QType::Q4_1 => {
                let mut si = 0i32;
                for j in 0..QK / 2 {
                    si += (blk[4 + j] & 0x0F) as i32 * ab.qs[j] as i32;
                    si += (blk[4 + j] >> 4) as i32 * ab.qs[j + QK / 2] as i32;
                }
                sum += si as f32 * (d * ab.d) + h(&blk[2..]) * ab.s;
            }
            QType::Q8_0 => {
                let mut si = 0i32;
                for j in 0..QK {
                    si += (blk[2 + j] as i8) as i32 * ab.qs[j] as i32;
                }
                sum += si as f32 * (d * ab.d);
            }
        }
    }
    sum
}

/// Dequantizes one block to f64 (tests' reference).
pub fn dequantize_block(ty: QType, blk: &[u8]) -> [f64; QK] {
    let d = h(blk) as f64;
    let mut v = [0f64; QK];
    match ty {
        QType::Q4_0 => {
            for j in 0..QK / 2 {
                v[j] = ((blk[2 + j] & 15) as f64 - 8.0) * d;
                v[j + 16] = ((blk[2 + j] >> 4) as f64 - 8.0) * d;
            }
        }
        QType::Q4_1 => {
            let m = h(&blk[2..]) as f64;
            for j in 0..QK / 2 {
                v[j] = (blk[4 + j] & 15) as f64 * d + m;
                v[j + 16] = (blk[4 + j] >> 4) as f64 * d + m;
            }
        }
        QType::Q8_0 => {
            for (j, x) in v.iter_mut().enumerate() {
                *x = (blk[2 + j] as i8) as f64 * d;
            }
        }
    }
    v
}

/// Quantizes f32 rows like ggml's reference quantizers (test data and tools).
pub fn quantize_weights(ty: QType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * ty.block_bytes());
    for v in x.chunks_exact(QK) {
        match ty {
            QType::Q4_0 => {
                let max = v
                    .iter()
                    .copied()
                    .fold(0f32, |m, a| if a.abs() > m.abs() { a } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for j in 0..QK / 2 {
                    let lo = ((v[j] * id + 8.5) as u8).min(15);
                    let hi = ((v[j + QK / 2] * id + 8.5) as u8).min(15);
                    out.push(lo | (hi << 4));
                }
            }
            QType::Q4_1 => {
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
            QType::Q8_0 => {
                let amax = v.iter().fold(0f32, |m, &a| m.max(a.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for &a in v {
                    out.push(((a * id).round() as i8) as u8);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 quantizer gives the plain one's blocks bit for bit: random rows at several
    /// scales, a zero block, and products that fall exactly half-way (`amax` 127: `1/d` is 1).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_quantizer_equals_the_plain_one() {
        if crate::Isa::detect() == crate::Isa::Scalar {
            return;
        }
        let mut x = crate::pseudo_random(QK * 64, 17);
        // Scales 1e-9 to 1e7: `d` down to fp16 subnormals and zero, and up past fp16's range.
        for (i, v) in x.chunks_exact_mut(QK).enumerate() {
            let scale = 10f32.powi(i as i32 % 17 - 9);
            v.iter_mut().for_each(|a| *a *= scale);
        }
        x[..QK].fill(0.0);
        for (j, a) in x[QK..2 * QK].iter_mut().enumerate() {
            *a = if j == 0 { 127.0 } else { j as f32 - 15.5 };
        }
        let blocks = x.len() / QK;
        let (mut plain, mut fast, mut fused) = (
            vec![ActBlock::default(); blocks],
            vec![ActBlock::default(); blocks],
            vec![ActBlock::default(); blocks],
        );
        let (mut plain_sums, mut fused_sums) = (Vec::new(), vec![0; blocks]);
        quantize_into_impl(&x, &mut plain);
        crate::packed::block_sums(&plain, &mut plain_sums);
        // SAFETY: a SIMD set (AVX2 and more) was detected.
        unsafe { quantize_into_avx2(&x, &mut fast) };
        quantize_with_sums(&x, &mut fused, &mut fused_sums);
        assert_eq!(plain_sums, fused_sums);
        for (b, p) in plain.iter().enumerate() {
            for f in [&fast[b], &fused[b]] {
                assert_eq!(p.qs, f.qs, "block {b}");
                assert_eq!(p.d.to_bits(), f.d.to_bits(), "block {b}");
                assert_eq!(p.s.to_bits(), f.s.to_bits(), "block {b}");
            }
        }
        // The scales did reach fp16's edges: an infinite `d`, a zero `d` from a nonzero block.
        assert!(plain.iter().any(|p| p.d.is_infinite()));
        assert!(plain[2..].iter().any(|p| p.d == 0.0));
        assert_eq!(fast[1].qs[1], -14); // -14.5 rounds to the even -14
        assert_eq!(fast[1].qs[2], -14); // -13.5 too
    }

    /// The AVX-512 quantizer (16 blocks at a time) gives the plain one's blocks, `d`, `s` and
    /// sums bit for bit at every block count around its group of 16, at scales 1e-9 to 1e7 (fp16
    /// subnormal, zero and infinite `d`) and on zero blocks; and the AVX2 one's on inputs the
    /// plain one does not define the same way (NaN, infinities, subnormal maxima), which both
    /// SIMD versions round and saturate alike.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_quantizer_equals_the_plain_and_avx2_ones() {
        if crate::Isa::detect() != crate::Isa::Avx512Vnni {
            return;
        }
        let same = |a: &[ActBlock], b: &[ActBlock], what: &str| {
            for (i, (p, f)) in a.iter().zip(b).enumerate() {
                assert_eq!(p.qs, f.qs, "{what} block {i}");
                assert_eq!(p.d.to_bits(), f.d.to_bits(), "{what} block {i}");
                assert_eq!(p.s.to_bits(), f.s.to_bits(), "{what} block {i}");
            }
        };
        for blocks in [1, 2, 15, 16, 17, 31, 32, 33, 71] {
            let mut x = crate::pseudo_random(QK * blocks, 40 + blocks as u32);
            for (i, v) in x.chunks_exact_mut(QK).enumerate() {
                let scale = 10f32.powi((i * 5 + blocks) as i32 % 17 - 9);
                v.iter_mut().for_each(|a| *a *= scale);
            }
            x[(blocks / 2) * QK..(blocks / 2 + 1) * QK].fill(0.0);
            let mut plain = vec![ActBlock::default(); blocks];
            let mut plain_sums = Vec::new();
            quantize_into_impl(&x, &mut plain);
            crate::packed::block_sums(&plain, &mut plain_sums);
            let (mut wide, mut bare) = (
                vec![ActBlock::default(); blocks],
                vec![ActBlock::default(); blocks],
            );
            // Sums start as garbage: every one must be written, and nothing past them.
            let mut sums = vec![i32::MIN; blocks + 1];
            // SAFETY: AVX-512 VNNI (with avx512f) was detected.
            unsafe { quantize_avx512(&x, &mut wide, &mut sums[..blocks]) };
            unsafe { quantize_avx512(&x, &mut bare, &mut []) };
            assert_eq!(plain_sums, sums[..blocks], "{blocks} blocks");
            assert_eq!(sums[blocks], i32::MIN, "{blocks} blocks");
            same(&plain, &wide, "sums");
            same(&plain, &bare, "no sums");
        }
        // Inputs outside the plain quantizer's domain: NaN values (skipped by the maximum,
        // converted to the integer indefinite and saturated), infinities, subnormal maxima
        // (`1/d` infinite), and values exactly half-way.
        let mut x = crate::pseudo_random(QK * 40, 9);
        for (i, v) in x.chunks_exact_mut(QK).enumerate() {
            match i % 5 {
                0 => v[i % QK] = f32::NAN,
                1 => {
                    v[(i * 3) % QK] = if i % 2 == 0 {
                        f32::INFINITY
                    } else {
                        -f32::INFINITY
                    }
                }
                2 => v.iter_mut().for_each(|a| *a *= 1e-40),
                3 => v
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, a)| *a = j as f32 - 15.5),
                _ => v.fill(f32::NAN),
            }
        }
        let blocks = x.len() / QK;
        let (mut avx2, mut wide) = (
            vec![ActBlock::default(); blocks],
            vec![ActBlock::default(); blocks],
        );
        let (mut avx2_sums, mut wide_sums) = (vec![0; blocks], vec![0; blocks]);
        // SAFETY: AVX-512 VNNI, and so AVX2, FMA and F16C, was detected.
        unsafe {
            quantize_avx2(&x, &mut avx2, &mut avx2_sums);
            quantize_avx512(&x, &mut wide, &mut wide_sums);
        }
        assert_eq!(avx2_sums, wide_sums);
        same(&avx2, &wide, "edge inputs");
    }
}
