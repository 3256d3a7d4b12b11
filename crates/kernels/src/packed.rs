//! Weights repacked at load into groups of 8 rows, so that one SIMD lane holds one row.
//!
//! In a packed `Q4_0`, `Q4_1` or `Q8_0` matrix, the blocks of 8 consecutive rows at the same block
//! index are stored together: the 8 fp16 scales first (one `vcvtph2ps` converts them all), then
//! the quants interleaved in 4-byte pieces, row `r`'s piece in 32-bit lane `r`. A kernel then
//! multiplies 4 activation values broadcast to all lanes with 4 quants of each of the 8 rows in
//! one `vpdpbusd`, and the 8 lanes accumulate the 8 rows' dot products: no horizontal sums, one
//! scale conversion per 8 blocks, and every activation load serves 8 rows. The packed matrix
//! has exactly the original size.
//!
//! Per block, 8 rows:
//! - `Q4_0` (144 bytes): 8 × fp16 `d`, then 4 vectors of 32 bytes; byte `4r + b` of vector `i`
//!   is byte `4i + b` of row `r`'s 16 nibble bytes, so its low nibble is quant `4i + b` and its
//!   high nibble quant `16 + 4i + b` (ggml's order). The quants stay unsigned (0..15) and the
//!   kernel subtracts `8 · Σa` from the integer sum.
//! - `Q4_1` (160 bytes): 8 × fp16 `d`, 8 × fp16 `m`, then the nibbles as in `Q4_0`. Per block,
//!   `Σ w·x = d·d_a·Σ q·a + m·s_a`, where `s_a = fp16(d_a·Σa)` is the activation block's
//!   stored sum (ggml's `Q8_1`): the 8 rows' `m` are converted at once like their `d`.
//! - `Q8_0` (272 bytes): 8 × fp16 `d`, then 8 vectors of 32 bytes; byte `4r + b` of vector `g`
//!   is quant `4g + b` of row `r`, stored as `q + 128` (unsigned, `q ^ 0x80`): `vpdpbusd`
//!   multiplies unsigned by signed bytes, and the kernel subtracts `128 · Σa`.
//!
//! The integer sums are the same as the unpacked kernels' (exact); only the order in which the
//! scaled block sums are added in f32 differs.
//!
//! On AVX-512, products of several tokens take two adjacent groups at once (`x86::vnni_pairs`):
//! one 512-bit vector holds group `g`'s lanes in its low half and group `g + 1`'s in its high
//! half, so each activation broadcast, conversion and float operation serves 16 rows. The
//! layout stays the 8-row one; every row's operations are the same as with one group.

use crate::quant::QType;

/// Rows per packed group (one 256-bit vector of i32 lanes).
pub const GROUP: usize = 8;

/// Whether a matrix of this many rows is packed (the SIMD paths only; every type packs).
pub fn packable(rows: usize) -> bool {
    rows.is_multiple_of(GROUP) && rows > 0
}

/// Bytes of fp16 scales at the start of a packed block.
const SCALES: usize = 2 * GROUP;

/// Bytes of fp16 scales and minima at the start of a packed `Q4_1` block.
const SCALES_MINS: usize = 4 * GROUP;

/// Memory of a packed matrix, zeroed, in transparent huge pages where the kernel grants them: a
/// step streaming through the weights then needs one TLB entry per 2 MiB instead of per 4 KiB.
/// From 2 MiB up a buffer is its own allocation aligned to 2 MiB. Smaller ones (a small
/// model's layer matrices: 69–553 KB in SmolLM2-135M) are cut one after another from shared
/// 2 MiB-aligned slabs, which would otherwise each sit in 4 KiB pages of their own; a slab's
/// memory is freed with the last buffer cut from it. Elsewhere (or if the kernel declines) it
/// is ordinary memory.
pub(crate) struct Buffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    _region: std::sync::Arc<Region>,
}

// SAFETY: the buffer owns its bytes of the region like a `Vec<u8>`; no two buffers overlap.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

/// Bytes of a transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Bytes of a slab that small buffers are cut from (address space: only the huge pages that
/// buffers touch become resident). The slab being cut from stays allocated until a buffer
/// needs a new one, even when all its buffers are gone.
const SLAB: usize = 16 * HUGE_PAGE;

/// One allocation, marked for huge pages before its first write.
struct Region {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the region is plain memory; its buffers coordinate access to disjoint ranges.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize, align: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align)
            .unwrap_or_else(|_| panic!("a buffer of {len} bytes exceeds the address space"));
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if len >= HUGE_PAGE && align == HUGE_PAGE {
            // SAFETY: whole 2 MiB pages inside this allocation; MADV_HUGEPAGE only changes how
            // the kernel backs them. Failure is harmless (4 KiB pages).
            unsafe {
                libc::madvise(
                    ptr.as_ptr() as *mut libc::c_void,
                    len / HUGE_PAGE * HUGE_PAGE,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
        Self { ptr, layout }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The slab small buffers are being cut from, and the bytes of it already handed out.
static SLAB_NOW: std::sync::Mutex<Option<(std::sync::Arc<Region>, usize)>> =
    std::sync::Mutex::new(None);

impl Buffer {
    pub(crate) fn zeroed(len: usize) -> Self {
        let (region, offset) = if len >= HUGE_PAGE {
            (std::sync::Arc::new(Region::new(len, HUGE_PAGE)), 0)
        } else {
            // A poisoned lock only means another thread panicked while holding it; the slab
            // state itself is always consistent.
            let mut now = SLAB_NOW.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |(_, used): &(std::sync::Arc<Region>, usize)| {
                used.next_multiple_of(64) + len <= SLAB
            };
            if !now.as_ref().is_some_and(fits) {
                *now = Some((std::sync::Arc::new(Region::new(SLAB, HUGE_PAGE)), 0));
            }
            let (region, used) = now.as_mut().expect("a slab was just made");
            let offset = used.next_multiple_of(64);
            *used = offset + len;
            (region.clone(), offset)
        };
        // SAFETY: `offset + len` bytes lie inside the region (checked above), and no other
        // buffer is given them.
        let ptr = unsafe { region.ptr.add(offset) };
        // SAFETY: `len` bytes at `ptr` belong to this buffer alone.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        Self {
            ptr,
            len,
            _region: region,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialized bytes owned by `self`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Repacks `src` (`rows` rows of `nb` GGUF blocks) into `dst` (same length).
pub fn pack(ty: QType, rows: usize, nb: usize, src: &[u8], dst: &mut [u8]) {
    let bb = ty.block_bytes();
    let pb = bb * GROUP;
    debug_assert_eq!(src.len(), rows * nb * bb);
    debug_assert_eq!(dst.len(), src.len());
    for (g, out) in dst.chunks_exact_mut(nb * pb).enumerate() {
        for (k, blk) in out.chunks_exact_mut(pb).enumerate() {
            for r in 0..GROUP {
                let o = ((g * GROUP + r) * nb + k) * bb;
                let b = &src[o..o + bb];
                blk[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
                match ty {
                    QType::Q4_0 => {
                        for i in 0..4 {
                            let at = SCALES + 32 * i + 4 * r;
                            blk[at..at + 4].copy_from_slice(&b[2 + 4 * i..6 + 4 * i]);
                        }
                    }
                    QType::Q8_0 => {
                        for i in 0..8 {
                            let at = SCALES + 32 * i + 4 * r;
                            for j in 0..4 {
                                blk[at + j] = b[2 + 4 * i + j] ^ 0x80;
                            }
                        }
                    }
                    QType::Q4_1 => {
                        blk[SCALES + 2 * r..SCALES + 2 * r + 2].copy_from_slice(&b[2..4]);
                        for i in 0..4 {
                            let at = SCALES_MINS + 32 * i + 4 * r;
                            blk[at..at + 4].copy_from_slice(&b[4 + 4 * i..8 + 4 * i]);
                        }
                    }
                }
            }
        }
    }
}

/// The inverse of [`pack`].
pub fn unpack(ty: QType, rows: usize, nb: usize, src: &[u8], dst: &mut [u8]) {
    let bb = ty.block_bytes();
    let pb = bb * GROUP;
    for (g, inp) in src.chunks_exact(nb * pb).enumerate() {
        for (k, blk) in inp.chunks_exact(pb).enumerate() {
            for r in 0..GROUP {
                let o = ((g * GROUP + r) * nb + k) * bb;
                let b = &mut dst[o..o + bb];
                b[..2].copy_from_slice(&blk[2 * r..2 * r + 2]);
                match ty {
                    QType::Q4_0 => {
                        for i in 0..4 {
                            let at = SCALES + 32 * i + 4 * r;
                            b[2 + 4 * i..6 + 4 * i].copy_from_slice(&blk[at..at + 4]);
                        }
                    }
                    QType::Q8_0 => {
                        for i in 0..8 {
                            let at = SCALES + 32 * i + 4 * r;
                            for j in 0..4 {
                                b[2 + 4 * i + j] = blk[at + j] ^ 0x80;
                            }
                        }
                    }
                    QType::Q4_1 => {
                        b[2..4].copy_from_slice(&blk[SCALES + 2 * r..SCALES + 2 * r + 2]);
                        for i in 0..4 {
                            let at = SCALES_MINS + 32 * i + 4 * r;
                            b[4 + 4 * i..8 + 4 * i].copy_from_slice(&blk[at..at + 4]);
                        }
                    }
                }
            }
        }
    }
    debug_assert_eq!(src.len(), rows * nb * bb);
}

/// `128 · Σa` for each activation block: the offset that `Q8_0`'s unsigned quants add to the
/// integer sum (`Q4_0`'s, `8 · Σa`, is a 16th of it). Kept scaled so that a kernel subtracts
/// it with a broadcast straight from memory: a broadcast from a general register would take a
/// slot of the two pipes that run the multiplies.
#[cfg(test)]
pub fn block_sums(acts: &[crate::ActBlock], out: &mut Vec<i32>) {
    out.clear();
    out.extend(
        acts.iter()
            .map(|a| 128 * a.qs.iter().map(|&q| q as i32).sum::<i32>()),
    );
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! One packed group (8 rows) against `NT` tokens, writing `out[t][0..8]`.
    #![allow(clippy::missing_safety_doc)]

    use super::*;
    use crate::ActBlock;
    use std::arch::x86_64::*;

    /// Activations of one token: its blocks and their quant sums.
    #[derive(Clone, Copy)]
    pub struct Act<'a> {
        pub blocks: &'a [ActBlock],
        pub sums: &'a [i32],
    }

    #[inline(always)]
    unsafe fn bcast(p: *const i8, i: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned((p as *const i32).add(i)))
    }

    /// Σ over 4-byte groups of u8 × i8 added to `acc` (AVX2: the pair sums fit in i16 for
    /// u ≤ 15 · 2 · 127; `Q8_0` on AVX2 goes through [`q8_avx2`] instead).
    #[inline(always)]
    unsafe fn dot_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
        )
    }

    #[inline(always)]
    unsafe fn dot_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }

    /// `Q8_0` on AVX2: back to signed weights and ggml's sign trick (`|w| · (a · sign(w))`),
    /// since `(q + 128) · a` pair sums overflow i16; the offset is then not applied.
    #[inline(always)]
    unsafe fn q8_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
        dot_avx2(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w))
    }

    /// Repeats `body` for `t` = 0..8 below `NT` (a constant), so that every `acc[t]` has a
    /// constant index and stays in a register (a loop over `t` kept them on the stack).
    macro_rules! each_token {
        ($nt:expr, $t:ident, $body:block) => {
            each_token!(@ $nt, $t, $body, 0 1 2 3 4 5 6 7)
        };
        (@ $nt:expr, $t:ident, $body:block, $($i:literal)*) => {
            $(
                if $i < $nt {
                    let $t = $i;
                    $body
                }
            )*
        };
    }

    macro_rules! group_kernels {
        ($module:ident, $features:literal, $dot4:ident, $dot8:ident, $off8:expr) => {
            pub mod $module {
                use super::*;

                #[target_feature(enable = $features)]
                pub unsafe fn q4_0<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
                    const { assert!(NT <= 8, "each_token! covers 8 tokens") };
                    let nb = a[0].blocks.len();
                    debug_assert_eq!(w.len(), nb * 144);
                    let mut acc = [_mm256_setzero_ps(); NT];
                    let mask = _mm256_set1_epi8(0x0F);
                    let mut p = w.as_ptr();
                    for k in 0..nb {
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                        let mut lo = [_mm256_setzero_si256(); 4];
                        let mut hi = [_mm256_setzero_si256(); 4];
                        for i in 0..4 {
                            let v = _mm256_loadu_si256(p.add(SCALES + 32 * i) as *const __m256i);
                            lo[i] = _mm256_and_si256(v, mask);
                            hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        }
                        each_token!(NT, t, {
                            let ab = a[t].blocks.get_unchecked(k);
                            let q = ab.qs.as_ptr();
                            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            for i in 0..4 {
                                s0 = $dot4(s0, lo[i], bcast(q, i));
                                s1 = $dot4(s1, hi[i], bcast(q, 4 + i));
                            }
                            let off = _mm256_set1_epi32(*a[t].sums.get_unchecked(k) >> 4);
                            let s = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), off);
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
                        });
                        p = p.add(144);
                    }
                    for t in 0..NT {
                        _mm256_storeu_ps(out[t], acc[t]);
                    }
                }

                /// `Q4_1`: `d·d_a·Σq·a + m·s_a` per block; no offset (the quants are 0..15).
                #[target_feature(enable = $features)]
                pub unsafe fn q4_1<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
                    const { assert!(NT <= 8, "each_token! covers 8 tokens") };
                    let nb = a[0].blocks.len();
                    debug_assert_eq!(w.len(), nb * 160);
                    // The `m·s` terms in their own sums, added at the end (as ggml does).
                    let mut acc = [_mm256_setzero_ps(); NT];
                    let mut mins = [_mm256_setzero_ps(); NT];
                    let mask = _mm256_set1_epi8(0x0F);
                    let mut p = w.as_ptr();
                    for k in 0..nb {
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                        let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(SCALES) as *const __m128i));
                        let mut lo = [_mm256_setzero_si256(); 4];
                        let mut hi = [_mm256_setzero_si256(); 4];
                        for i in 0..4 {
                            let at = SCALES_MINS + 32 * i;
                            let v = _mm256_loadu_si256(p.add(at) as *const __m256i);
                            lo[i] = _mm256_and_si256(v, mask);
                            hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        }
                        each_token!(NT, t, {
                            let ab = a[t].blocks.get_unchecked(k);
                            let q = ab.qs.as_ptr();
                            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            for i in 0..4 {
                                s0 = $dot4(s0, lo[i], bcast(q, i));
                                s1 = $dot4(s1, hi[i], bcast(q, 4 + i));
                            }
                            let s = _mm256_add_epi32(s0, s1);
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
                            mins[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), mins[t]);
                        });
                        p = p.add(160);
                    }
                    for t in 0..NT {
                        _mm256_storeu_ps(out[t], _mm256_add_ps(acc[t], mins[t]));
                    }
                }

                #[target_feature(enable = $features)]
                pub unsafe fn q8_0<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
                    const { assert!(NT <= 8, "each_token! covers 8 tokens") };
                    let nb = a[0].blocks.len();
                    debug_assert_eq!(w.len(), nb * 272);
                    let mut acc = [_mm256_setzero_ps(); NT];
                    let mut p = w.as_ptr();
                    for k in 0..nb {
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                        let mut u = [_mm256_setzero_si256(); 8];
                        for (i, u) in u.iter_mut().enumerate() {
                            *u = _mm256_loadu_si256(p.add(SCALES + 32 * i) as *const __m256i);
                        }
                        each_token!(NT, t, {
                            let ab = a[t].blocks.get_unchecked(k);
                            let q = ab.qs.as_ptr();
                            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            for i in 0..4 {
                                s0 = $dot8(s0, u[i], bcast(q, i));
                                s1 = $dot8(s1, u[4 + i], bcast(q, 4 + i));
                            }
                            let mut s = _mm256_add_epi32(s0, s1);
                            if $off8 {
                                let off = _mm256_set1_epi32(*a[t].sums.get_unchecked(k));
                                s = _mm256_sub_epi32(s, off);
                            }
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
                        });
                        p = p.add(272);
                    }
                    for t in 0..NT {
                        _mm256_storeu_ps(out[t], acc[t]);
                    }
                }
            }
        };
    }

    /// Tiles of several tokens on AVX-512 VNNI with the integer sums taken weight vector by
    /// weight vector across the tokens (every token's `vpdpbusd` for one vector, then the next
    /// vector), not token by token: the tile's tokens give 8 independent chains at every step
    /// instead of two short ones per token, and the weights are unpacked as they are used. The
    /// integer sums are exact in any order and the f32 operations per token are [`vnni`]'s, so
    /// the results are [`vnni`]'s bit for bit (a row's numbers do not depend on the tile).
    pub mod vnni_tiles {
        use super::*;

        /// [`vnni::q4_1`] for `NT` tokens.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        pub unsafe fn q4_1<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
            let nb = a[0].blocks.len();
            debug_assert_eq!(w.len(), nb * 160);
            let mut acc = [_mm256_setzero_ps(); NT];
            let mut mins = [_mm256_setzero_ps(); NT];
            let mask = _mm256_set1_epi8(0x0F);
            let mut p = w.as_ptr();
            for k in 0..nb {
                let mut s = [_mm256_setzero_si256(); NT];
                for i in 0..4 {
                    let v = _mm256_loadu_si256(p.add(SCALES_MINS + 32 * i) as *const __m256i);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for (s, a) in s.iter_mut().zip(&a) {
                        *s = dot_vnni(*s, lo, bcast(a.blocks.get_unchecked(k).qs.as_ptr(), i));
                    }
                    for (s, a) in s.iter_mut().zip(&a) {
                        let q = a.blocks.get_unchecked(k).qs.as_ptr();
                        *s = dot_vnni(*s, hi, bcast(q, 4 + i));
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(SCALES) as *const __m128i));
                for t in 0..NT {
                    let ab = a[t].blocks.get_unchecked(k);
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), scale, acc[t]);
                    mins[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), mins[t]);
                }
                p = p.add(160);
            }
            for t in 0..NT {
                _mm256_storeu_ps(out[t], _mm256_add_ps(acc[t], mins[t]));
            }
        }

        /// [`vnni::q8_0`] for `NT` tokens.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        pub unsafe fn q8_0<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
            let nb = a[0].blocks.len();
            debug_assert_eq!(w.len(), nb * 272);
            let mut acc = [_mm256_setzero_ps(); NT];
            let mut p = w.as_ptr();
            for k in 0..nb {
                let mut s = [_mm256_setzero_si256(); NT];
                for i in 0..8 {
                    let u = _mm256_loadu_si256(p.add(SCALES + 32 * i) as *const __m256i);
                    for (s, a) in s.iter_mut().zip(&a) {
                        *s = dot_vnni(*s, u, bcast(a.blocks.get_unchecked(k).qs.as_ptr(), i));
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                for t in 0..NT {
                    let ab = a[t].blocks.get_unchecked(k);
                    let off = _mm256_set1_epi32(*a[t].sums.get_unchecked(k));
                    let si = _mm256_sub_epi32(s[t], off);
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, acc[t]);
                }
                p = p.add(272);
            }
            for t in 0..NT {
                _mm256_storeu_ps(out[t], acc[t]);
            }
        }
    }

    /// [`vnni_tiles`] on two adjacent groups at once (16 rows, `w` holding both): each 512-bit
    /// vector holds group `g`'s 8 lanes in its low half and group `g + 1`'s in its high half,
    /// so every activation broadcast, conversion and float operation serves 16 rows. Zen 4 runs
    /// a 512-bit operation in two halves, so the multiplies cost the same pipe time; what
    /// halves is everything around them. Each lane's operations are [`vnni_tiles`]'s, so the
    /// values are the same bit for bit; `out[t]` receives 16 values.
    pub mod vnni_pairs {
        use super::*;

        /// Group `g`'s 32 bytes at `p` in the low half, group `g + 1`'s at `p + gb` in the high.
        #[inline(always)]
        unsafe fn pair(p: *const u8, gb: usize) -> __m512i {
            let lo = _mm256_loadu_si256(p as *const __m256i);
            let hi = _mm256_loadu_si256(p.add(gb) as *const __m256i);
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
        }

        /// The two groups' 8 fp16 values at `p` and `p + gb` as 16 f32.
        #[inline(always)]
        unsafe fn pair_f16(p: *const u8, gb: usize) -> __m512 {
            let lo = _mm_loadu_si128(p as *const __m128i);
            let hi = _mm_loadu_si128(p.add(gb) as *const __m128i);
            _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1))
        }

        #[inline(always)]
        unsafe fn bcast16(p: *const i8, i: usize) -> __m512i {
            _mm512_set1_epi32(std::ptr::read_unaligned((p as *const i32).add(i)))
        }

        /// Block `k`'s integer sums of 4-bit quants (group `g`'s 4 vectors of nibbles at `p`,
        /// group `g + 1`'s at `p + gb`) with each token's quants: every token's `vpdpbusd` for
        /// one vector, then the next vector (exact in any order).
        #[inline(always)]
        unsafe fn nibble_sums<const NT: usize>(
            p: *const u8,
            gb: usize,
            a: &[Act; NT],
            k: usize,
        ) -> [__m512i; NT] {
            let mask = _mm512_set1_epi8(0x0F);
            let mut s = [_mm512_setzero_si512(); NT];
            for i in 0..4 {
                let v = pair(p.add(32 * i), gb);
                let lo = _mm512_and_si512(v, mask);
                // A 32-bit shift (AVX-512F) is as good as a 16-bit one: the mask drops the bits
                // that cross into a neighbouring byte.
                let hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), mask);
                for (s, a) in s.iter_mut().zip(a) {
                    let q = a.blocks.get_unchecked(k).qs.as_ptr();
                    *s = _mm512_dpbusd_epi32(*s, lo, bcast16(q, i));
                }
                for (s, a) in s.iter_mut().zip(a) {
                    let q = a.blocks.get_unchecked(k).qs.as_ptr();
                    *s = _mm512_dpbusd_epi32(*s, hi, bcast16(q, 4 + i));
                }
            }
            s
        }

        /// [`vnni::q4_0`] for groups `g` and `g + 1`, the integer sums taken as in
        /// [`vnni_tiles`] (exact in any order).
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        pub unsafe fn q4_0<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
            let nb = a[0].blocks.len();
            let gb = nb * 144;
            debug_assert_eq!(w.len(), 2 * gb);
            let mut acc = [_mm512_setzero_ps(); NT];
            let mut p = w.as_ptr();
            for k in 0..nb {
                let s = nibble_sums(p.add(SCALES), gb, &a, k);
                let d = pair_f16(p, gb);
                for t in 0..NT {
                    let ab = a[t].blocks.get_unchecked(k);
                    let off = _mm512_set1_epi32(*a[t].sums.get_unchecked(k) >> 4);
                    let si = _mm512_sub_epi32(s[t], off);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(ab.d));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), scale, acc[t]);
                }
                p = p.add(144);
            }
            for t in 0..NT {
                _mm512_storeu_ps(out[t], acc[t]);
            }
        }

        /// [`vnni_tiles::q4_1`] for groups `g` and `g + 1`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        pub unsafe fn q4_1<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
            let nb = a[0].blocks.len();
            let gb = nb * 160;
            debug_assert_eq!(w.len(), 2 * gb);
            let mut acc = [_mm512_setzero_ps(); NT];
            let mut mins = [_mm512_setzero_ps(); NT];
            let mut p = w.as_ptr();
            for k in 0..nb {
                let s = nibble_sums(p.add(SCALES_MINS), gb, &a, k);
                let d = pair_f16(p, gb);
                let m = pair_f16(p.add(SCALES), gb);
                for t in 0..NT {
                    let ab = a[t].blocks.get_unchecked(k);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(ab.d));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), scale, acc[t]);
                    mins[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(ab.s), mins[t]);
                }
                p = p.add(160);
            }
            for t in 0..NT {
                _mm512_storeu_ps(out[t], _mm512_add_ps(acc[t], mins[t]));
            }
        }

        /// [`vnni_tiles::q8_0`] for groups `g` and `g + 1`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
        pub unsafe fn q8_0<const NT: usize>(w: &[u8], a: [Act; NT], out: [*mut f32; NT]) {
            let nb = a[0].blocks.len();
            let gb = nb * 272;
            debug_assert_eq!(w.len(), 2 * gb);
            let mut acc = [_mm512_setzero_ps(); NT];
            let mut p = w.as_ptr();
            for k in 0..nb {
                let mut s = [_mm512_setzero_si512(); NT];
                for i in 0..8 {
                    let u = pair(p.add(SCALES + 32 * i), gb);
                    for (s, a) in s.iter_mut().zip(&a) {
                        let q = a.blocks.get_unchecked(k).qs.as_ptr();
                        *s = _mm512_dpbusd_epi32(*s, u, bcast16(q, i));
                    }
                }
                let d = pair_f16(p, gb);
                for t in 0..NT {
                    let ab = a[t].blocks.get_unchecked(k);
                    let off = _mm512_set1_epi32(*a[t].sums.get_unchecked(k));
                    let si = _mm512_sub_epi32(s[t], off);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(ab.d));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), scale, acc[t]);
                }
                p = p.add(272);
            }
            for t in 0..NT {
                _mm512_storeu_ps(out[t], acc[t]);
            }
        }
    }

    group_kernels!(avx2, "avx2,fma,f16c", dot_avx2, q8_avx2, false);
    group_kernels!(
        vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        dot_vnni,
        dot_vnni,
        true
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QK;

    /// Buffers from 2 MiB up start on a 2 MiB boundary; every buffer reads as zeros.
    #[test]
    fn buffers_are_zeroed_and_large_ones_aligned() {
        for len in [0, 1, 4096, HUGE_PAGE, 3 * HUGE_PAGE + 5] {
            let mut b = Buffer::zeroed(len);
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|&v| v == 0));
            if len >= HUGE_PAGE {
                assert_eq!(b.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            }
            b.as_mut_slice().iter_mut().for_each(|v| *v = 7);
            assert!(b.as_slice().iter().all(|&v| v == 7));
        }
    }

    /// Small buffers are cut from shared 2 MiB-aligned slabs without overlapping, and their
    /// memory stays valid while any of them lives.
    #[test]
    fn small_buffers_share_slabs() {
        let mut all: Vec<Buffer> = (0..40).map(|i| Buffer::zeroed(300_000 + i)).collect();
        for (i, b) in all.iter_mut().enumerate() {
            assert!(b.as_slice().iter().all(|&v| v == 0));
            assert_eq!(b.as_slice().as_ptr() as usize % 64, 0);
            b.as_mut_slice().iter_mut().for_each(|v| *v = i as u8);
        }
        let mut spans: Vec<(usize, usize)> = all
            .iter()
            .map(|b| (b.as_slice().as_ptr() as usize, b.as_slice().len()))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        let slabs: std::collections::HashSet<usize> = all
            .iter()
            .map(|b| std::sync::Arc::as_ptr(&b._region) as usize)
            .collect();
        assert!(slabs.len() < all.len() / 4, "{} slabs", slabs.len());
        for b in &all {
            let base = b._region.ptr.as_ptr() as usize;
            assert_eq!(base % HUGE_PAGE, 0);
        }
        all.drain(..20);
        for (i, b) in all.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&v| v == (i + 20) as u8));
        }
    }

    #[test]
    fn unpack_inverts_pack() {
        let (rows, nb) = (16, 3);
        for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let src: Vec<u8> = (0..rows * nb * ty.block_bytes())
                .map(|i| (i * 7 + i / 13) as u8)
                .collect();
            let mut packed = vec![0u8; src.len()];
            pack(ty, rows, nb, &src, &mut packed);
            assert_ne!(packed, src);
            let mut back = vec![0u8; src.len()];
            unpack(ty, rows, nb, &packed, &mut back);
            assert_eq!(back, src, "{ty:?}");
        }
    }

    #[test]
    fn packed_lanes_hold_rows() {
        // Row r's block k: scale bytes (r, k), quant bytes distinct per (r, k, j).
        let (rows, nb) = (8, 2);
        let ty = QType::Q8_0;
        let bb = ty.block_bytes();
        let mut src = vec![0u8; rows * nb * bb];
        for r in 0..rows {
            for k in 0..nb {
                let b = &mut src[(r * nb + k) * bb..(r * nb + k + 1) * bb];
                b[0] = r as u8;
                b[1] = k as u8;
                for j in 0..QK {
                    b[2 + j] = (r * 32 + j) as u8 ^ (k as u8 * 3);
                }
            }
        }
        let mut p = vec![0u8; src.len()];
        pack(ty, rows, nb, &src, &mut p);
        let k = 1;
        let blk = &p[k * bb * GROUP..(k + 1) * bb * GROUP];
        for r in 0..rows {
            assert_eq!(&blk[2 * r..2 * r + 2], &[r as u8, k as u8]);
            for j in 0..QK {
                let at = SCALES + 32 * (j / 4) + 4 * r + j % 4;
                assert_eq!(blk[at] ^ 0x80, (r * 32 + j) as u8 ^ (k as u8 * 3));
            }
        }
    }
}

#[cfg(test)]
mod q4_1_tests {
    use super::*;

    /// Row `r`'s block `k` of a packed `Q4_1` group: `d` and `m` in lane `r` of the scale and
    /// minimum vectors, nibble byte `j` at byte `4r + j % 4` of vector `j / 4`.
    #[test]
    fn packed_q4_1_lanes_hold_rows() {
        let (rows, nb) = (8, 2);
        let ty = QType::Q4_1;
        let bb = ty.block_bytes();
        let src: Vec<u8> = (0..rows * nb * bb).map(|i| (i * 5 + i / 7) as u8).collect();
        let mut p = vec![0u8; src.len()];
        pack(ty, rows, nb, &src, &mut p);
        for k in 0..nb {
            let blk = &p[k * bb * GROUP..(k + 1) * bb * GROUP];
            for r in 0..rows {
                let b = &src[(r * nb + k) * bb..(r * nb + k + 1) * bb];
                assert_eq!(&blk[2 * r..2 * r + 2], &b[..2]);
                assert_eq!(&blk[SCALES + 2 * r..SCALES + 2 * r + 2], &b[2..4]);
                for j in 0..16 {
                    assert_eq!(blk[SCALES_MINS + 32 * (j / 4) + 4 * r + j % 4], b[4 + j]);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod vnni_tiles_tests {
    use super::x86::{vnni, vnni_pairs, vnni_tiles, Act};
    use super::*;
    use crate::{pseudo_random, quantize_into, quantize_weights, ActBlock, Isa, QK};

    /// The tile kernels give the token-by-token kernels' values bit for bit, for full tiles of 8
    /// and a partial one, on `Q4_1` and `Q8_0` groups of 18 blocks.
    #[test]
    fn tiles_equal_the_token_by_token_kernels() {
        if Isa::detect() != Isa::Avx512Vnni {
            return;
        }
        let nb = 18;
        let x = pseudo_random(8 * nb * QK, 31);
        let mut blocks = vec![ActBlock::default(); 8 * nb];
        quantize_into(&x, &mut blocks);
        let mut sums = Vec::new();
        block_sums(&blocks, &mut sums);
        let act = |t: usize| Act {
            blocks: &blocks[t * nb..(t + 1) * nb],
            sums: &sums[t * nb..(t + 1) * nb],
        };
        for ty in [QType::Q4_1, QType::Q8_0] {
            let src = quantize_weights(ty, &pseudo_random(GROUP * nb * QK, 32));
            let mut w = vec![0u8; src.len()];
            pack(ty, GROUP, nb, &src, &mut w);
            let mut want = [[0f32; GROUP]; 8];
            let mut got = [[0f32; GROUP]; 8];
            let mut part = [[0f32; GROUP]; 3];
            // SAFETY: AVX-512 VNNI was detected; `w` is one group of `nb` blocks; every output
            // has 8 values.
            unsafe {
                let outs = |o: &mut [[f32; GROUP]]| -> Vec<*mut f32> {
                    o.iter_mut().map(|r| r.as_mut_ptr()).collect()
                };
                let tiled: [*mut f32; 8] = outs(&mut got).try_into().unwrap();
                let three: [*mut f32; 3] = outs(&mut part).try_into().unwrap();
                for (t, o) in want.iter_mut().enumerate() {
                    match ty {
                        QType::Q4_1 => vnni::q4_1(&w, [act(t)], [o.as_mut_ptr()]),
                        _ => vnni::q8_0(&w, [act(t)], [o.as_mut_ptr()]),
                    }
                }
                match ty {
                    QType::Q4_1 => {
                        vnni_tiles::q4_1(&w, std::array::from_fn(act), tiled);
                        vnni_tiles::q4_1(&w, std::array::from_fn(|t| act(t + 5)), three);
                    }
                    _ => {
                        vnni_tiles::q8_0(&w, std::array::from_fn(act), tiled);
                        vnni_tiles::q8_0(&w, std::array::from_fn(|t| act(t + 5)), three);
                    }
                }
            }
            let bits = |r: &[[f32; GROUP]]| -> Vec<u32> {
                r.iter().flatten().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "{ty:?}");
            assert_eq!(bits(&part), bits(&want[5..]), "{ty:?}");
        }
    }

    /// Two adjacent groups through [`vnni_pairs`] against `NT` tokens: 16 values per token.
    fn pairs<const NT: usize>(ty: QType, w: &[u8], a: [Act; NT]) -> Vec<[f32; 2 * GROUP]> {
        let mut out = vec![[0f32; 2 * GROUP]; NT];
        let ptrs: [*mut f32; NT] = std::array::from_fn(|t| out[t].as_mut_ptr());
        // SAFETY: callers check for AVX-512 VNNI; `w` holds two groups of `a`'s block count;
        // every output has 16 values.
        unsafe {
            match ty {
                QType::Q4_0 => vnni_pairs::q4_0(w, a, ptrs),
                QType::Q4_1 => vnni_pairs::q4_1(w, a, ptrs),
                QType::Q8_0 => vnni_pairs::q8_0(w, a, ptrs),
            }
        }
        out
    }

    /// The pair kernels give, in the low and high halves of each token's 16 values, the
    /// token-by-token kernels' values for the first and the second group bit for bit, for every
    /// type and tiles of 1, 3 and 8 tokens.
    #[test]
    fn pairs_equal_the_token_by_token_kernels() {
        if Isa::detect() != Isa::Avx512Vnni {
            return;
        }
        let nb = 18;
        let x = pseudo_random(8 * nb * QK, 41);
        let mut blocks = vec![ActBlock::default(); 8 * nb];
        quantize_into(&x, &mut blocks);
        let mut sums = Vec::new();
        block_sums(&blocks, &mut sums);
        let act = |t: usize| Act {
            blocks: &blocks[t * nb..(t + 1) * nb],
            sums: &sums[t * nb..(t + 1) * nb],
        };
        for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let src = quantize_weights(ty, &pseudo_random(2 * GROUP * nb * QK, 42));
            let mut w = vec![0u8; src.len()];
            pack(ty, 2 * GROUP, nb, &src, &mut w);
            let gb = w.len() / 2;
            // want[t]: group 0's 8 values, then group 1's.
            let want: Vec<[f32; 2 * GROUP]> = (0..8)
                .map(|t| {
                    let mut o = [0f32; 2 * GROUP];
                    for (g, half) in o.chunks_exact_mut(GROUP).enumerate() {
                        let wg = &w[g * gb..(g + 1) * gb];
                        let p = [half.as_mut_ptr()];
                        // SAFETY: AVX-512 VNNI was detected; `wg` is one group of `nb`
                        // blocks; the output has 8 values.
                        unsafe {
                            match ty {
                                QType::Q4_0 => vnni::q4_0(wg, [act(t)], p),
                                QType::Q4_1 => vnni::q4_1(wg, [act(t)], p),
                                QType::Q8_0 => vnni::q8_0(wg, [act(t)], p),
                            }
                        }
                    }
                    o
                })
                .collect();
            assert_ne!(want[0][..GROUP], want[0][GROUP..], "two different groups");
            let bits = |r: &[[f32; 2 * GROUP]]| -> Vec<u32> {
                r.iter().flatten().map(|v| v.to_bits()).collect()
            };
            let eight = pairs::<8>(ty, &w, std::array::from_fn(act));
            assert_eq!(bits(&eight), bits(&want), "{ty:?} 8 tokens");
            let three = pairs::<3>(ty, &w, std::array::from_fn(|t| act(t + 4)));
            assert_eq!(bits(&three), bits(&want[4..7]), "{ty:?} 3 tokens");
            let one = pairs(ty, &w, [act(7)]);
            assert_eq!(bits(&one), bits(&want[7..]), "{ty:?} 1 token");
        }
    }
}
