//! `e^x` over f32 slices with exactly the bits of the platform's `expf` (what `f32::exp`
//! calls), vectorized, and SwiGLU's `silu(g) · u` on it, for models whose results must stay
//! bit-identical to candle's tensor ops (candle's `silu` is `v / (1 + (−v).exp())`).
//!
//! glibc (2.27 and later; x86-64 picks the build compiled with FMA contraction when the CPU
//! has FMA and AVX2) computes `expf` in double precision as a fixed sequence of correctly
//! rounded operations, so a vector reproduction of that sequence gives the same bits:
//!
//! - `z = x · 32/ln2`; `k = round(z)` by adding and subtracting `1.5·2^52` (fused with the
//!   product); `r = x · 32/ln2 − k` as one fused multiply-subtract;
//! - `s = 2^(k/32)`: the double `2^((k mod 32)/32)` from a 32-entry table, with `k div 32`
//!   added to its exponent field by an integer add (the table entries have the index bits
//!   that the add carries in taken out beforehand);
//! - `y = s · ((c0·r + c1)·r² + (c2·r + 1))`, the three inner steps fused, the cubic a
//!   minimax fit of `2^(r/32)` on `|r| ≤ 1/2`; rounded once to f32.
//!
//! Arguments with `|x| ≥ 88` (near overflow and underflow, infinities, NaN) take glibc's own
//! branches; the vector code computes those lanes with `f32::exp` itself. Because the claim
//! is "equal to the platform's `expf`", the vector path is checked once at first use against
//! `f32::exp` on a spread of arguments and not used if any differs (another libm, an older
//! glibc); it exists only for x86-64 Linux with glibc. The tests compare every 97th f32 bit
//! pattern; `examples/exp_exhaustive.rs` compares all 2^32.

/// Which code computes the exponentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpPath {
    /// `f32::exp`, one value at a time.
    Scalar,
    /// AVX2 + FMA, 8 values per step (the table read by gathers).
    Avx2,
    /// AVX-512F, 16 values per step (the table held in four registers, read by permutes).
    Avx512,
}

impl ExpPath {
    /// Every path this CPU and platform can run, scalar first.
    pub fn available() -> Vec<ExpPath> {
        [ExpPath::Scalar, ExpPath::Avx2, ExpPath::Avx512]
            .into_iter()
            .filter(|p| p.supported())
            .collect()
    }

    /// Whether this CPU and platform can run the path (no allocation: the feature checks
    /// are cached by the standard library).
    pub fn supported(self) -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                ExpPath::Scalar => true,
                ExpPath::Avx2 => avx2,
                ExpPath::Avx512 => avx2 && is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
        {
            self == ExpPath::Scalar
        }
    }

    /// The path [`exp_in_place`] and [`silu_mul`] use: the best available one that agrees
    /// with `f32::exp` on [`self_check`]'s arguments (decided once).
    pub fn chosen() -> ExpPath {
        static CHOSEN: std::sync::OnceLock<ExpPath> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = *Self::available().last().unwrap_or(&ExpPath::Scalar);
            if self_check(best) {
                best
            } else {
                ExpPath::Scalar
            }
        })
    }

    /// `self`, or scalar where this CPU cannot run it.
    fn runnable(self) -> ExpPath {
        if self.supported() {
            self
        } else {
            ExpPath::Scalar
        }
    }
}

/// Whether `path` gives `f32::exp`'s bits on a few dozen arguments spread over the range the
/// vector code computes itself (`|x| < 88`, results from subnormal to near `f32::MAX`), plus
/// a few it hands back to `f32::exp`.
pub fn self_check(path: ExpPath) -> bool {
    let mut xs: Vec<f32> = (0..56)
        .map(|i| {
            // Irregular steps so the table index and the rounding of k vary.
            let t = (i as f32 * 0.618_034).fract() * 2.0 - 1.0;
            t * 87.9 + i as f32 * 1e-3
        })
        .collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-8,
        0.5,
        -std::f32::consts::LN_2,
        87.99,
        -87.99,
        -87.5,
        88.5,
        -100.0,
        f32::NAN,
        // The two f32 arguments (of all 2^32) whose result changes when `r` is computed from
        // the rounded product instead of one fused operation; glibc's SSE2 build (chosen on
        // CPUs without FMA, or when glibc's tunables mask it) differs from its FMA build here.
        f32::from_bits(0xc27c_65d9),
        f32::from_bits(0x4202_422f),
    ]);
    let mut got = xs.clone();
    exp_in_place_on(path, &mut got);
    xs.iter()
        .zip(&got)
        .all(|(&x, &y)| std::hint::black_box(x).exp().to_bits() == y.to_bits())
}

/// `x ← e^x` for each element, bit for bit `f32::exp`.
pub fn exp_in_place(x: &mut [f32]) {
    exp_in_place_on(ExpPath::chosen(), x)
}

/// [`exp_in_place`] on a given path (scalar where the CPU cannot run it).
pub fn exp_in_place_on(path: ExpPath, x: &mut [f32]) {
    match path.runnable() {
        ExpPath::Scalar => x.iter_mut().for_each(|v| *v = v.exp()),
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        // SAFETY: `runnable` checked that the CPU has the features.
        ExpPath::Avx2 => unsafe { x86::avx2::exp_in_place(x) },
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above.
        ExpPath::Avx512 => unsafe { x86::avx512::exp_in_place(x) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("runnable() returns only paths compiled in"),
    }
}

/// SwiGLU's `silu(g) · u` as candle computes it, one value.
#[inline(always)]
fn silu_mul_one(v: f32, u: f32) -> f32 {
    v / (1.0 + (-v).exp()) * u
}

/// `gate ← silu(gate) · up`, with `silu(v) = v / (1 + e^(−v))` computed exactly as candle's
/// `silu` then the product (the same bits).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_on(ExpPath::chosen(), gate, up)
}

/// [`silu_mul`] on a given path (scalar where the CPU cannot run it).
pub fn silu_mul_on(path: ExpPath, gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    match path.runnable() {
        ExpPath::Scalar => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = silu_mul_one(*g, u);
            }
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        // SAFETY: `runnable` checked that the CPU has the features.
        ExpPath::Avx2 => unsafe { x86::avx2::silu_mul(gate, up) },
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above.
        ExpPath::Avx512 => unsafe { x86::avx512::silu_mul(gate, up) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("runnable() returns only paths compiled in"),
    }
}

/// The algorithm's constants (see the module comment), as double bit patterns.
#[cfg_attr(
    not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")),
    allow(dead_code)
)]
mod consts {
    /// 32/ln2.
    pub const INV_LN2_N: u64 = 0x4047_1547_652b_82fe;
    /// 1.5·2^52: adding it rounds to an integer held in the low mantissa bits.
    pub const SHIFT: u64 = 0x4338_0000_0000_0000;
    /// The cubic's coefficients for `r` in units of 1/32: `ln2³/6/32³`-ish, `ln2²/2/32²`-ish,
    /// `ln2/32`-ish (minimax values, not the Taylor ones).
    pub const C0: u64 = 0x3ebc_6af8_4b91_2394;
    pub const C1: u64 = 0x3f2e_bfce_50fa_c4f3;
    pub const C2: u64 = 0x3f96_2e42_ff0c_52d6;
    /// Arguments whose top 12 bits without the sign (`bits >> 20 & 0x7ff`) exceed this,
    /// `|x| ≥ 88`, take the special branches.
    pub const TOP_MAX: u32 = 0x42a;

    /// `2^(i/32)` rounded to the nearest double, i = 0..32 (checked in 300-bit arithmetic).
    const POW2: [u64; 32] = [
        0x3ff0000000000000,
        0x3ff059b0d3158574,
        0x3ff0b5586cf9890f,
        0x3ff11301d0125b51,
        0x3ff172b83c7d517b,
        0x3ff1d4873168b9aa,
        0x3ff2387a6e756238,
        0x3ff29e9df51fdee1,
        0x3ff306fe0a31b715,
        0x3ff371a7373aa9cb,
        0x3ff3dea64c123422,
        0x3ff44e086061892d,
        0x3ff4bfdad5362a27,
        0x3ff5342b569d4f82,
        0x3ff5ab07dd485429,
        0x3ff6247eb03a5585,
        0x3ff6a09e667f3bcd,
        0x3ff71f75e8ec5f74,
        0x3ff7a11473eb0187,
        0x3ff82589994cce13,
        0x3ff8ace5422aa0db,
        0x3ff93737b0cdc5e5,
        0x3ff9c49182a3f090,
        0x3ffa5503b23e255d,
        0x3ffae89f995ad3ad,
        0x3ffb7f76f2fb5e47,
        0x3ffc199bdd85529c,
        0x3ffcb720dcef9069,
        0x3ffd5818dcfba487,
        0x3ffdfc97337b9b5f,
        0x3ffea4afa2a490da,
        0x3fff50765b6e4540,
    ];

    /// The table as read: `POW2[i]` with `i << 47` taken out, because the integer add of
    /// `k << 47` puts `k mod 32` there along with `k div 32` in the exponent field.
    #[repr(align(64))]
    pub struct Table(pub [u64; 32]);
    pub static TABLE: Table = {
        let mut t = [0u64; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = POW2[i] - ((i as u64) << 47);
            i += 1;
        }
        Table(t)
    };
}

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
mod x86 {
    use super::consts::*;
    use super::silu_mul_one;
    use std::arch::x86_64::*;

    /// `p[j] ← e^xs[j]` for the lanes `j` set in `s` (rare: `|x| ≥ 88` or NaN), out of line
    /// so that the vector loops keep their constants in registers across it.
    #[cold]
    #[inline(never)]
    unsafe fn fix_exp(mut s: u32, xs: &[f32], p: *mut f32) {
        while s != 0 {
            let j = s.trailing_zeros() as usize;
            *p.add(j) = xs[j].exp();
            s &= s - 1;
        }
    }

    /// `g[j] ← silu(gs[j]) · u[j]` for the lanes `j` set in `s`, as [`fix_exp`].
    #[cold]
    #[inline(never)]
    unsafe fn fix_silu(mut s: u32, gs: &[f32], u: *const f32, g: *mut f32) {
        while s != 0 {
            let j = s.trailing_zeros() as usize;
            *g.add(j) = silu_mul_one(gs[j], *u.add(j));
            s &= s - 1;
        }
    }

    pub mod avx512 {
        use super::*;

        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn c(bits: u64) -> __m512d {
            _mm512_set1_pd(f64::from_bits(bits))
        }

        /// `e^x` of 8 values in double precision, rounded to f32 (lanes with `|x| ≥ 88`
        /// give garbage; the caller replaces them).
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn exp8(x: __m256) -> __m256 {
            let xd = _mm512_cvtps_pd(x);
            let kd_shifted = _mm512_fmadd_pd(c(INV_LN2_N), xd, c(SHIFT));
            let ki = _mm512_castpd_si512(kd_shifted);
            let kd = _mm512_sub_pd(kd_shifted, c(SHIFT));
            let r = _mm512_fmsub_pd(c(INV_LN2_N), xd, kd);
            // TABLE[ki mod 32]: permutes read index bits 0..3 over two registers; bit 4
            // picks the pair.
            let tp = TABLE.0.as_ptr() as *const __m512i;
            let lo =
                _mm512_permutex2var_epi64(_mm512_load_si512(tp), ki, _mm512_load_si512(tp.add(1)));
            let hi = _mm512_permutex2var_epi64(
                _mm512_load_si512(tp.add(2)),
                ki,
                _mm512_load_si512(tp.add(3)),
            );
            let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
            let t = _mm512_mask_blend_epi64(upper, lo, hi);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let z = _mm512_fmadd_pd(c(C0), r, c(C1));
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(c(C2), r, _mm512_set1_pd(1.0));
            let y = _mm512_fmadd_pd(z, r2, y);
            _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
        }

        /// `e^x` of 16 values and the mask of lanes with `|x| ≥ 88` or NaN (left to the
        /// caller).
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn exp16(x: __m512) -> (__m512, u16) {
            let top = _mm512_and_si512(
                _mm512_srli_epi32::<20>(_mm512_castps_si512(x)),
                _mm512_set1_epi32(0x7ff),
            );
            let special = _mm512_cmpgt_epu32_mask(top, _mm512_set1_epi32(TOP_MAX as i32));
            let xd = _mm512_castps_pd(x);
            let lo = exp8(_mm256_castpd_ps(_mm512_castpd512_pd256(xd)));
            let hi = exp8(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(xd)));
            let y = _mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                _mm256_castps_pd(hi),
            );
            (_mm512_castpd_ps(y), special)
        }

        /// Lanes of the block at `i` (of `n`) that exist.
        fn lanes(i: usize, n: usize) -> u16 {
            if n - i >= 16 {
                u16::MAX
            } else {
                (1u16 << (n - i)) - 1
            }
        }

        #[target_feature(enable = "avx512f")]
        pub unsafe fn exp_in_place(x: &mut [f32]) {
            let n = x.len();
            let p = x.as_mut_ptr();
            let mut i = 0;
            while i < n {
                let m = lanes(i, n);
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                let (e, special) = exp16(v);
                _mm512_mask_storeu_ps(p.add(i), m, e);
                let s = special & m;
                if s != 0 {
                    let mut vs = [0f32; 16];
                    _mm512_storeu_ps(vs.as_mut_ptr(), v);
                    fix_exp(s as u32, &vs, p.add(i));
                }
                i += 16;
            }
        }

        #[target_feature(enable = "avx512f")]
        pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
            let n = gate.len().min(up.len());
            let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
            let one = _mm512_set1_ps(1.0);
            let sign = _mm512_set1_epi32(i32::MIN);
            let mut i = 0;
            while i < n {
                let m = lanes(i, n);
                let v = _mm512_maskz_loadu_ps(m, g.add(i));
                let w = _mm512_maskz_loadu_ps(m, u.add(i));
                let neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
                let (e, special) = exp16(neg);
                let out = _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)), w);
                _mm512_mask_storeu_ps(g.add(i), m, out);
                let s = special & m;
                if s != 0 {
                    let mut gs = [0f32; 16];
                    _mm512_storeu_ps(gs.as_mut_ptr(), v);
                    fix_silu(s as u32, &gs, u.add(i), g.add(i));
                }
                i += 16;
            }
        }
    }

    pub mod avx2 {
        use super::*;

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn c(bits: u64) -> __m256d {
            _mm256_set1_pd(f64::from_bits(bits))
        }

        /// `e^x` of 4 values (see `avx512::exp8`; the table read by a gather).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn exp4(x: __m128) -> __m128 {
            let xd = _mm256_cvtps_pd(x);
            let kd_shifted = _mm256_fmadd_pd(c(INV_LN2_N), xd, c(SHIFT));
            let ki = _mm256_castpd_si256(kd_shifted);
            let kd = _mm256_sub_pd(kd_shifted, c(SHIFT));
            let r = _mm256_fmsub_pd(c(INV_LN2_N), xd, kd);
            let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
            let t = _mm256_i64gather_epi64::<8>(TABLE.0.as_ptr() as *const i64, idx);
            let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
            let z = _mm256_fmadd_pd(c(C0), r, c(C1));
            let r2 = _mm256_mul_pd(r, r);
            let y = _mm256_fmadd_pd(c(C2), r, _mm256_set1_pd(1.0));
            let y = _mm256_fmadd_pd(z, r2, y);
            _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
        }

        /// `e^x` of 8 values and the mask of lanes the caller must compute itself.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn exp8(x: __m256) -> (__m256, u32) {
            let top = _mm256_and_si256(
                _mm256_srli_epi32::<20>(_mm256_castps_si256(x)),
                _mm256_set1_epi32(0x7ff),
            );
            let special = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(TOP_MAX as i32));
            let lo = exp4(_mm256_castps256_ps128(x));
            let hi = exp4(_mm256_extractf128_ps::<1>(x));
            let special = _mm256_movemask_ps(_mm256_castsi256_ps(special)) as u32;
            (_mm256_set_m128(hi, lo), special)
        }

        /// `e^x` of the 8 values at `p`, in place.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn exp_block(p: *mut f32) {
            let v = _mm256_loadu_ps(p);
            let (e, special) = exp8(v);
            _mm256_storeu_ps(p, e);
            if special != 0 {
                let mut vs = [0f32; 8];
                _mm256_storeu_ps(vs.as_mut_ptr(), v);
                fix_exp(special, &vs, p);
            }
        }

        /// `silu(g) · u` of the 8 values at `g` and `u`, into `g`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn silu_block(g: *mut f32, u: *const f32) {
            let v = _mm256_loadu_ps(g);
            let w = _mm256_loadu_ps(u);
            let (e, special) = exp8(_mm256_xor_ps(v, _mm256_set1_ps(-0.0)));
            let out = _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), e)), w);
            _mm256_storeu_ps(g, out);
            if special != 0 {
                let mut vs = [0f32; 8];
                _mm256_storeu_ps(vs.as_mut_ptr(), v);
                fix_silu(special, &vs, u, g);
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn exp_in_place(x: &mut [f32]) {
            let whole = x.len() / 8 * 8;
            for i in (0..whole).step_by(8) {
                exp_block(x.as_mut_ptr().add(i));
            }
            let rest = &mut x[whole..];
            if !rest.is_empty() {
                // Zeros in the unused lanes: ordinary arguments.
                let mut pad = [0f32; 8];
                pad[..rest.len()].copy_from_slice(rest);
                exp_block(pad.as_mut_ptr());
                let k = rest.len();
                rest.copy_from_slice(&pad[..k]);
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
            let n = gate.len().min(up.len());
            let whole = n / 8 * 8;
            for i in (0..whole).step_by(8) {
                silu_block(gate.as_mut_ptr().add(i), up.as_ptr().add(i));
            }
            if whole < n {
                let (mut pg, mut pu) = ([0f32; 8], [0f32; 8]);
                pg[..n - whole].copy_from_slice(&gate[whole..n]);
                pu[..n - whole].copy_from_slice(&up[whole..n]);
                silu_block(pg.as_mut_ptr(), pu.as_ptr());
                gate[whole..n].copy_from_slice(&pg[..n - whole]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every path against `f32::exp` (the platform's libm) bit for bit, NaN payloads included.
    use super::*;

    fn vector_paths() -> Vec<ExpPath> {
        ExpPath::available()
            .into_iter()
            .filter(|&p| p != ExpPath::Scalar)
            .collect()
    }

    fn reference(x: &[f32]) -> Vec<u32> {
        x.iter()
            .map(|&v| std::hint::black_box(v).exp().to_bits())
            .collect()
    }

    fn check(path: ExpPath, xs: &[f32]) {
        let mut got = xs.to_vec();
        exp_in_place_on(path, &mut got);
        for ((&x, &want), got) in xs.iter().zip(&reference(xs)).zip(&got) {
            assert_eq!(
                got.to_bits(),
                want,
                "{path:?}: exp({x:e} = {:#010x}) = {got:e}, f32::exp gives {:e}",
                x.to_bits(),
                f32::from_bits(want)
            );
        }
    }

    /// Every 97th bit pattern over the whole f32 range (44 million arguments: both signs,
    /// subnormal to huge, infinities and NaNs).
    #[test]
    fn every_97th_f32_matches_libm() {
        const STEP: u64 = 97;
        const CHUNK: usize = 1 << 16;
        for path in vector_paths() {
            let mut bits = 0u64;
            let mut xs = Vec::with_capacity(CHUNK);
            while bits < 1 << 32 {
                xs.clear();
                while xs.len() < CHUNK && bits < 1 << 32 {
                    xs.push(f32::from_bits(bits as u32));
                    bits += STEP;
                }
                check(path, &xs);
            }
        }
    }

    /// The edges of glibc's branches, results near overflow and in the subnormal range,
    /// infinities, NaNs with payloads, and every length up to 40 (partial blocks).
    #[test]
    fn special_arguments_and_lengths_match_libm() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // signaling NaN
            f32::from_bits(0xffc1_2345), // negative quiet NaN with a payload
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_0001),
        ];
        // Around |x| = 88 (the fast range's edge), the overflow threshold 0x1.62e42ep6, the
        // underflow thresholds -0x1.9fe368p6 and -0x1.9d1d9ep6, and ln(f32::MIN_POSITIVE).
        for edge in [
            0x42b0_0000u32,
            0xc2b0_0000,
            0x42b1_7217,
            0xc2cf_f1b4,
            0xc2ce_8ecf,
            0xc2ae_ac50,
        ] {
            for d in -40i32..=40 {
                xs.push(f32::from_bits(edge.wrapping_add_signed(d)));
            }
        }
        // The two arguments (of all 2^32) whose result changes when `r` is computed as a
        // rounded product then a subtraction instead of one fused operation (found by
        // `examples/exp_exhaustive.rs` on such a variant).
        xs.extend([f32::from_bits(0xc27c_65d9), f32::from_bits(0x4202_422f)]);
        // Subnormal results inside the fast range: x in (-88, -87.33).
        xs.extend((0..2000).map(|i| -87.33 - i as f32 * 0.000_34));
        // Tiny arguments, where e^x rounds to 1 or just below/above it.
        xs.extend((0..200).map(|i| f32::from_bits(0x3300_0000 + i * 0x0010_0001)));
        xs.extend((0..200).map(|i| f32::from_bits(0xb300_0000 + i * 0x0010_0001)));
        for path in vector_paths() {
            check(path, &xs);
            for len in 0..=40 {
                check(path, &xs[..len]);
                check(path, &xs[7..7 + len]);
            }
        }
    }

    #[test]
    fn silu_mul_matches_candles_expression() {
        let mut g: Vec<f32> = (0..3000)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 40.0)
            .collect();
        g.extend([
            0.0,
            -0.0,
            88.0,
            -88.0,
            95.0,
            -95.0,
            200.0,
            -200.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xffc1_2345),
            f32::MAX,
            f32::MIN,
        ]);
        let mut u: Vec<f32> = (0..g.len())
            .map(|i| ((i as f32 * 0.414_213_5).fract() - 0.5) * 6.0)
            .collect();
        u[5] = f32::NAN;
        u[6] = f32::INFINITY;
        let want: Vec<u32> = g
            .iter()
            .zip(&u)
            .map(|(&v, &u)| (std::hint::black_box(v) / (1.0 + (-v).exp()) * u).to_bits())
            .collect();
        for path in ExpPath::available() {
            for range in [0..g.len(), 3..3 + 37, 2990..g.len(), 0..0, 11..12] {
                let mut out = g[range.clone()].to_vec();
                silu_mul_on(path, &mut out, &u[range.clone()]);
                let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want[range.clone()], "{path:?} on {range:?}");
            }
        }
    }

    #[test]
    fn the_self_check_passes_on_every_path_here() {
        for path in ExpPath::available() {
            assert!(self_check(path), "{path:?}");
        }
        assert_eq!(ExpPath::chosen(), *ExpPath::available().last().unwrap());
    }

    /// With glibc's tunables masking AVX2 and FMA, the process's `expf` is glibc's SSE2
    /// build, which differs from the FMA build on two arguments: the self-check must then
    /// turn the vector paths down. The test runs itself again in a child process with those
    /// tunables (they are read at start-up).
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_self_check_turns_down_a_different_expf() {
        const CHILD: &str = "CAMELID_EXPF_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let y = std::hint::black_box(f32::from_bits(0xc27c_65d9)).exp();
            if y.to_bits() != 0x11fa_2992 {
                println!("expf-child: the FMA build is still in use");
                return;
            }
            for path in vector_paths() {
                assert!(!self_check(path), "{path:?} passed against the SSE2 build");
            }
            assert_eq!(ExpPath::chosen(), ExpPath::Scalar);
            let (mut g, u) = (vec![f32::from_bits(0x427c_65d9); 20], vec![1.0f32; 20]);
            silu_mul(&mut g, &u);
            let want = std::hint::black_box(f32::from_bits(0x427c_65d9));
            assert_eq!(g[19].to_bits(), (want / (1.0 + (-want).exp())).to_bits());
            println!("expf-child: vector paths turned down");
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "expf::tests::the_self_check_turns_down_a_different_expf",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2,-FMA")
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed:\n{stdout}");
        if vector_paths().is_empty() || stdout.contains("still in use") {
            // Nothing to turn down, or a glibc without these tunables.
            return;
        }
        assert!(
            stdout.contains("vector paths turned down"),
            "child said:\n{stdout}"
        );
    }

    #[test]
    fn the_table_holds_powers_of_two() {
        for (i, &t) in consts::TABLE.0.iter().enumerate() {
            let v = f64::from_bits(t + ((i as u64) << 47));
            let want = (i as f64 / 32.0).exp2();
            assert!(
                (v - want).abs() <= f64::EPSILON * want,
                "entry {i}: {v} vs {want}"
            );
        }
    }
}
