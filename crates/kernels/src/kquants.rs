//! Products with GGUF k-quant weights (`Q4_K`, `Q5_K`, `Q6_K`: 256 values a super-block), and
//! with the 5-bit `Q5_0` and `Q5_1` (`q5.rs`), computed as ggml's CPU backend computes them, so
//! that logits agree with llama.cpp's.
//!
//! The activations are quantized to ggml's `Q8_K` (256 values a block, an f32 scale
//! `d = −max/127` of the signed value of largest magnitude, round half to even, and the sums of
//! each 16 quants); each super-block's product is an exact integer sum of
//! `scale · Σ q·a` (less the offsets: `32 · Σ scale · bsum` for `Q6_K`, `min · Σ a` for `Q4_K`
//! and `Q5_K`), in the same 8 integer lanes as ggml's AVX2 kernel, scaled by
//! `d_a · fp16(d)` and accumulated in f32 the same way.
//!
//! Blocks are read in place (the file's layout); each weight row is unpacked once per tile of
//! tokens in prefill. A group of matrices of mixed types (a `Q5_0` query beside a `Q6_K` value
//! projection) shares each activation format, quantized once. AVX2 (`vpmaddubsw` + `vpmaddwd`) or AVX-512 VNNI (`vpdpwssd` fusing the
//! scale product with the sum) is chosen at run time; the scalar path computes the same integer
//! sums and is always tested.

use crate::quant::{ActBlock, QK};
use crate::{q5, Data, Isa, KernelError, SharedOut, TILE};
use half::f16;
use std::cell::RefCell;
use std::sync::Arc;

/// Values per super-block.
pub const QK_K: usize = 256;

/// A GGUF k-quant weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KType {
    /// 144 bytes: fp16 `d`, fp16 `dmin`, 12 bytes of 6-bit scales and mins for 8 sub-blocks of
    /// 32, 128 bytes of nibbles; `w = d·sc·q − dmin·m`.
    Q4K,
    /// 176 bytes: as `Q4_K` plus 32 bytes of fifth bits (before the nibbles).
    Q5K,
    /// 210 bytes: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 signed 8-bit scales (one
    /// per 16 values), fp16 `d`; `w = d·sc·(q − 32)`.
    Q6K,
    /// 22 bytes per 32 values: `w = d·(q − 16)`, `Q8_0` activations.
    Q5_0,
    /// 24 bytes per 32 values: `w = d·q + m`, `Q8_1` activations.
    Q5_1,
}

impl KType {
    pub fn block_bytes(self) -> usize {
        match self {
            KType::Q4K => 144,
            KType::Q5K => 176,
            KType::Q6K => 210,
            KType::Q5_0 => 22,
            KType::Q5_1 => 24,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        if self.k_quant() {
            QK_K
        } else {
            QK
        }
    }

    /// A 256-value type on `Q8_K` activations (else 32 values on `Q8_0`/`Q8_1`).
    fn k_quant(self) -> bool {
        matches!(self, KType::Q4K | KType::Q5K | KType::Q6K)
    }

    pub fn name(self) -> &'static str {
        match self {
            KType::Q4K => "Q4_K",
            KType::Q5K => "Q5_K",
            KType::Q6K => "Q6_K",
            KType::Q5_0 => "Q5_0",
            KType::Q5_1 => "Q5_1",
        }
    }
}

/// ggml's `block_q8_K`: `a = d·q`, `bsums[j] = Σ q[16j..16j + 16]`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for Q8KBlock {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

fn h(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

#[inline(always)]
fn quantize_q8k_impl(x: &[f32], out: &mut [Q8KBlock]) {
    for (v, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &a in v {
            if a.abs() > amax {
                amax = a.abs();
                max = a;
            }
        }
        if amax == 0.0 {
            *blk = Q8KBlock::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &a) in blk.qs.iter_mut().zip(v) {
            *q = ((iscale * a).round_ties_even() as i32).min(127) as i8;
        }
        for (s, q) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| q as i16).sum();
        }
        blk.d = 1.0 / iscale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8k_avx2(x: &[f32], out: &mut [Q8KBlock]) {
    // The same code: with these features `round_ties_even` is one instruction.
    quantize_q8k_impl(x, out)
}

/// Quantizes `x` (a multiple of 256 values) into `out` (`x.len() / 256` blocks) as ggml's
/// `quantize_row_q8_K` does.
pub fn quantize_q8k(x: &[f32], out: &mut [Q8KBlock]) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() != Isa::Scalar {
        // SAFETY: avx2, fma and f16c were detected at run time.
        return unsafe { quantize_q8k_avx2(x, out) };
    }
    quantize_q8k_impl(x, out)
}

/// The 8 six-bit scales and 8 mins of a `Q4_K`/`Q5_K` block (ggml's `utmp` unpacking): bytes
/// 0..8 scales, 8..16 mins.
#[inline(always)]
fn scales_mins(s: &[u8]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let v1 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let v2 = u1 & KMASK1;
    let v0 = u0 & KMASK1;
    let mut out = [0u8; 16];
    for (i, w) in [v0, v1, v2, u3].into_iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The unsigned quants of one block in value order (`Q6_K`: 0..63, before the −32).
fn block_quants(ty: KType, b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    match ty {
        KType::Q4K | KType::Q5K => {
            let (qh, qs) = match ty {
                KType::Q5K => (Some(&b[16..48]), &b[48..176]),
                _ => (None, &b[16..144]),
            };
            for j in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * j + l];
                    let (mut lo, mut hi) = (byte & 15, byte >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    q[64 * j + l] = lo;
                    q[64 * j + 32 + l] = hi;
                }
            }
        }
        KType::Q5_0 | KType::Q5_1 => unreachable!("32-value types are decoded in q5.rs"),
        KType::Q6K => {
            let (ql, qh) = (&b[..128], &b[128..192]);
            for n in 0..2 {
                for l in 0..32 {
                    let (a, c, hb) = (ql[64 * n + l], ql[64 * n + 32 + l], qh[32 * n + l]);
                    q[128 * n + l] = (a & 15) | ((hb & 3) << 4);
                    q[128 * n + 32 + l] = (c & 15) | (((hb >> 2) & 3) << 4);
                    q[128 * n + 64 + l] = (a >> 4) | (((hb >> 4) & 3) << 4);
                    q[128 * n + 96 + l] = (c >> 4) | (((hb >> 6) & 3) << 4);
                }
            }
        }
    }
    q
}

/// Scalar dot product of one k-quant weight row (raw blocks) with one activation row.
fn dot_scalar(ty: KType, w: &[u8], a: &[Q8KBlock]) -> f32 {
    let (mut sum, mut mins) = (0f32, 0f32);
    for (b, ab) in w.chunks_exact(ty.block_bytes()).zip(a) {
        let q = block_quants(ty, b);
        match ty {
            KType::Q4K | KType::Q5K => {
                let sm = scales_mins(&b[4..16]);
                let (mut isum, mut msum) = (0i32, 0i32);
                for j in 0..8 {
                    let s: i32 = (32 * j..32 * j + 32)
                        .map(|i| q[i] as i32 * ab.qs[i] as i32)
                        .sum();
                    isum += sm[j] as i32 * s;
                    msum +=
                        sm[8 + j] as i32 * (ab.bsums[2 * j] as i32 + ab.bsums[2 * j + 1] as i32);
                }
                sum += ab.d * h(b) * isum as f32;
                mins += -ab.d * h(&b[2..]) * msum as f32;
            }
            KType::Q6K => {
                let mut isum = 0i32;
                for j in 0..16 {
                    let s: i32 = (16 * j..16 * j + 16)
                        .map(|i| (q[i] as i32 - 32) * ab.qs[i] as i32)
                        .sum();
                    isum += (b[192 + j] as i8) as i32 * s;
                }
                sum += ab.d * h(&b[208..]) * isum as f32;
            }
            KType::Q5_0 | KType::Q5_1 => unreachable!("32-value types take Q8_0/Q8_1"),
        }
    }
    sum + mins
}

/// Dequantizes one block (`ty.block_values()` values) to f64 (tests' reference), as ggml's
/// `dequantize_row_*`.
pub fn dequantize_block(ty: KType, b: &[u8]) -> Vec<f64> {
    match ty {
        KType::Q5_0 => return q5::dequantize_block(false, b).to_vec(),
        KType::Q5_1 => return q5::dequantize_block(true, b).to_vec(),
        _ => {}
    }
    let q = block_quants(ty, b);
    let mut v = [0f64; QK_K];
    match ty {
        KType::Q4K | KType::Q5K => {
            let (d, dmin) = (h(b) as f64, h(&b[2..]) as f64);
            let sm = scales_mins(&b[4..16]);
            for (i, x) in v.iter_mut().enumerate() {
                *x = d * sm[i / 32] as f64 * q[i] as f64 - dmin * sm[8 + i / 32] as f64;
            }
        }
        KType::Q6K => {
            let d = h(&b[208..]) as f64;
            for (i, x) in v.iter_mut().enumerate() {
                let sc = (b[192 + (i / 128) * 8 + (i % 128) / 16] as i8) as f64;
                *x = d * sc * (q[i] as f64 - 32.0);
            }
        }
        KType::Q5_0 | KType::Q5_1 => unreachable!("returned above"),
    }
    v.to_vec()
}

/// A `[rows, cols]` k-quant weight matrix, each row `cols / 256` blocks as in the file.
pub struct KMatrix {
    pub rows: usize,
    pub cols: usize,
    ty: KType,
    data: Data,
    isa: Isa,
}

impl KMatrix {
    /// From the raw GGUF bytes of a tensor of type `ty` (copied).
    pub fn from_bytes(
        ty: KType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, KernelError> {
        Self::check(ty, rows, cols, bytes.len())?;
        Ok(Self {
            rows,
            cols,
            ty,
            data: Data::Owned(bytes.to_vec()),
            isa: Isa::detect(),
        })
    }

    /// Reads the blocks in place at `range` of `owner` (a mapped file).
    pub fn from_shared(
        ty: KType,
        rows: usize,
        cols: usize,
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Result<Self, KernelError> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(KernelError(format!(
                "{} [{rows}, {cols}]: bytes {range:?} are outside the {len} available",
                ty.name()
            )));
        }
        Self::check(ty, rows, cols, range.len())?;
        Ok(Self {
            rows,
            cols,
            ty,
            data: Data::Shared(owner, range),
            isa: Isa::detect(),
        })
    }

    fn check(ty: KType, rows: usize, cols: usize, len: usize) -> Result<(), KernelError> {
        let bv = ty.block_values();
        if !cols.is_multiple_of(bv) {
            return Err(KernelError(format!(
                "{} rows must be a multiple of {bv} values, got {cols}",
                ty.name()
            )));
        }
        let want = rows * cols / bv * ty.block_bytes();
        if len != want {
            return Err(KernelError(format!(
                "{} [{rows}, {cols}] needs {want} bytes, got {len}",
                ty.name()
            )));
        }
        Ok(())
    }

    /// Forces an instruction set (tests compare every path); ignored if the CPU lacks it.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        if Isa::available().contains(&isa) {
            self.isa = isa;
        }
        self
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn ktype(&self) -> KType {
        self.ty
    }

    /// `NT` tokens' dot products with the weight row `w`.
    fn dot_tile<const NT: usize>(&self, w: &[u8], a: [&[Q8KBlock]; NT]) -> [f32; NT] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a set detected on this CPU, and every activation row holds
        // `cols / 256` blocks (checked by the callers).
        unsafe {
            match (self.isa, self.ty) {
                (Isa::Avx2, KType::Q4K) => return x86::avx2::q4_k(w, a),
                (Isa::Avx2, KType::Q5K) => return x86::avx2::q5_k(w, a),
                (Isa::Avx2, KType::Q6K) => return x86::avx2::q6_k(w, a),
                (Isa::Avx512Vnni, KType::Q4K) => return x86::vnni::q4_k(w, a),
                (Isa::Avx512Vnni, KType::Q5K) => return x86::vnni::q5_k(w, a),
                (Isa::Avx512Vnni, KType::Q6K) => return x86::vnni::q6_k(w, a),
                _ => {}
            }
        }
        a.map(|a| dot_scalar(self.ty, w, a))
    }

    /// `NT` tokens' dot products with the `Q5_0`/`Q5_1` weight row `w`.
    fn dot_tile_5<const NT: usize>(&self, w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_tile`.
        unsafe {
            match (self.isa, self.ty) {
                (Isa::Avx2, KType::Q5_0) => return q5::x86::avx2::q5_0(w, a),
                (Isa::Avx2, KType::Q5_1) => return q5::x86::avx2::q5_1(w, a),
                (Isa::Avx512Vnni, KType::Q5_0) => return q5::x86::vnni::q5_0(w, a),
                (Isa::Avx512Vnni, KType::Q5_1) => return q5::x86::vnni::q5_1(w, a),
                _ => {}
            }
        }
        a.map(|a| q5::dot_scalar(self.ty == KType::Q5_1, w, a))
    }

    /// `out[t][r] = Σ_c w[r][c] · x[t][c]` for `tokens` rows of `x` (`[tokens, cols]`),
    /// writing `[tokens, rows]`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<(), KernelError> {
        kmatmul_group(&[self], x, tokens, &mut [out])
    }

    /// Rows `rows` for tokens `tokens`: each row stays in L1 while the tiles of tokens pass.
    fn run_rows<'a, A: RowDot>(
        &self,
        rows: std::ops::Range<usize>,
        act: &dyn Fn(usize) -> &'a [A],
        tokens: std::ops::Range<usize>,
        dst: SharedOut,
    ) {
        // AVX-512 has the registers for 8 tokens' accumulators beside the unpacked block.
        if self.isa == Isa::Avx512Vnni {
            self.run_rows_tiled::<A, WIDE_TILE>(rows, act, tokens, dst)
        } else {
            self.run_rows_tiled::<A, TILE>(rows, act, tokens, dst)
        }
    }

    fn run_rows_tiled<'a, A: RowDot, const NT: usize>(
        &self,
        rows: std::ops::Range<usize>,
        act: &dyn Fn(usize) -> &'a [A],
        tokens: std::ops::Range<usize>,
        dst: SharedOut,
    ) {
        let bb = self.ty.block_bytes();
        let (bytes, rb) = (self.data.bytes(), self.cols / self.ty.block_values() * bb);
        for r in rows {
            let w = &bytes[r * rb..(r + 1) * rb];
            let put = |t: usize, v: f32| {
                // SAFETY: row `r` belongs to this task alone, and `t * rows + r` is in bounds
                // (output lengths checked by `kmatmul_group`).
                unsafe { dst.write(t * self.rows + r, v) }
            };
            let mut t = tokens.start;
            while t < tokens.end {
                if tokens.end - t >= NT {
                    let v = A::dot::<NT>(self, w, std::array::from_fn(|k| act(t + k)));
                    for (k, v) in v.into_iter().enumerate() {
                        put(t + k, v);
                    }
                    t += NT;
                } else {
                    put(t, A::dot(self, w, [act(t)])[0]);
                    t += 1;
                }
            }
        }
    }
}

/// Tokens per tile on AVX-512 (32 vector registers).
const WIDE_TILE: usize = 8;

/// An activation block format and the row kernels that take it.
trait RowDot: Sized + Sync {
    fn dot<const NT: usize>(m: &KMatrix, w: &[u8], a: [&[Self]; NT]) -> [f32; NT];
}

impl RowDot for Q8KBlock {
    fn dot<const NT: usize>(m: &KMatrix, w: &[u8], a: [&[Self]; NT]) -> [f32; NT] {
        m.dot_tile(w, a)
    }
}

impl RowDot for ActBlock {
    fn dot<const NT: usize>(m: &KMatrix, w: &[u8], a: [&[Self]; NT]) -> [f32; NT] {
        m.dot_tile_5(w, a)
    }
}

thread_local! {
    /// The quantized input in both formats, reused between calls (no allocation per token).
    static ACTS: RefCell<(Vec<Q8KBlock>, Vec<ActBlock>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Bytes of quantized activations a prefill keeps in L2 while a task's rows pass over them.
const ACT_BUDGET: usize = 192 * 1024;

/// Several k-quant matrices with the same number of columns applied to the same input `x`
/// (`[tokens, cols]`): `outs[i]` gets `[tokens, mats[i].rows]`. The input is quantized once and
/// all rows are shared out in one parallel region on the kernels' pool.
pub fn kmatmul_group(
    mats: &[&KMatrix],
    x: &[f32],
    tokens: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let Some(first) = mats.first() else {
        return Ok(());
    };
    let cols = first.cols;
    if outs.len() != mats.len() {
        return Err(KernelError(format!(
            "{} matrices but {} outputs",
            mats.len(),
            outs.len()
        )));
    }
    for (m, o) in mats.iter().zip(outs.iter()) {
        if m.cols != cols || x.len() != tokens * cols || o.len() != tokens * m.rows {
            return Err(KernelError(format!(
                "matmul shapes: x has {} values for {tokens}×{}, out has {} for {tokens}×{}",
                x.len(),
                m.cols,
                o.len(),
                m.rows
            )));
        }
    }
    if tokens == 0 {
        return Ok(());
    }
    let needs = |k: bool| mats.iter().any(|m| m.ty.k_quant() == k);
    let (per_k, per_32) = (cols / QK_K, cols / QK);
    // Taken out of the thread-local for the call (another pass may run a product on this
    // thread while it waits in the parallel region).
    let mut buffer = ACTS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    {
        let (kbuf, buf32) = &mut buffer;
        let mut token_bytes = 0;
        if needs(true) {
            kbuf.resize(tokens * per_k, Q8KBlock::default());
            quantize_q8k(x, kbuf);
            token_bytes += per_k * std::mem::size_of::<Q8KBlock>();
        }
        if needs(false) {
            buf32.resize(tokens * per_32, ActBlock::default());
            crate::quantize_rows(x, tokens, buf32, None);
            token_bytes += per_32 * std::mem::size_of::<ActBlock>();
        }
        let (kacts, acts32) = (&kbuf[..], &buf32[..]);
        let act_k = |t: usize| &kacts[t * per_k..(t + 1) * per_k];
        let act_32 = |t: usize| &acts32[t * per_32..(t + 1) * per_32];
        let dsts: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
        let spans = crate::Spans::new(mats.iter().map(|m| m.rows));
        let total = spans.total();
        let chunk = (ACT_BUDGET / token_bytes.max(1)).max(WIDE_TILE) / WIDE_TILE * WIDE_TILE;
        let work = |range: std::ops::Range<usize>| {
            let mut c = 0;
            while c < tokens {
                let c_end = (c + chunk).min(tokens);
                spans.for_each(range.clone(), |mi, rows| {
                    let m = mats[mi];
                    if m.ty.k_quant() {
                        m.run_rows(rows, &act_k, c..c_end, dsts[mi]);
                    } else {
                        m.run_rows(rows, &act_32, c..c_end, dsts[mi]);
                    }
                });
                c = c_end;
            }
        };
        // Shared out in units of 8 rows, as `matmul_group` does.
        let group = crate::packed::GROUP;
        crate::parallel_units(total.div_ceil(group), tokens, &|u: std::ops::Range<
            usize,
        >| {
            work(u.start * group..(u.end * group).min(total))
        });
    }
    ACTS.with(|a| *a.borrow_mut() = buffer);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! One weight row against `NT` tokens. The same code is generated for AVX2 and for
    //! AVX-512 VNNI by `kernels!`; they differ only in how a row of 16-bit products is scaled
    //! and added to the 8 integer lanes (`vpmaddwd` + `vpaddd`, or one `vpdpwssd`).
    #![allow(clippy::missing_safety_doc)]

    use super::Q8KBlock;
    use crate::simd::{f16_at, hsum};
    use std::arch::x86_64::*;

    /// `Q6_K`: bytes `[2i; 8] ++ [2i + 1; 8]` pick the two scales of 32-value vector `i`.
    static Q6_SHUFFLE: [[u8; 16]; 8] = {
        let mut t = [[0u8; 16]; 8];
        let mut i = 0;
        while i < 8 {
            let mut j = 0;
            while j < 16 {
                t[i][j] = (2 * i + j / 8) as u8;
                j += 1;
            }
            i += 1;
        }
        t
    };

    /// `Q4_K`/`Q5_K`: bytes `[2j, 2j + 1]` repeated pick the 16-bit scale `j` for every lane.
    static K4_SHUFFLE: [[u8; 32]; 8] = {
        let mut t = [[0u8; 32]; 8];
        let mut i = 0;
        while i < 8 {
            let mut j = 0;
            while j < 32 {
                t[i][j] = (2 * i + j % 2) as u8;
                j += 1;
            }
            i += 1;
        }
        t
    };

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    macro_rules! kernels {
        ($module:ident, $features:literal, $scaled_add:ident) => {
            pub mod $module {
                use super::*;

                #[target_feature(enable = $features)]
                pub unsafe fn q6_k<const NT: usize>(w: &[u8], a: [&[Q8KBlock]; NT]) -> [f32; NT] {
                    let nb = w.len() / 210;
                    let (m3, m15) = (_mm256_set1_epi8(3), _mm256_set1_epi8(15));
                    let mut acc = [_mm256_setzero_ps(); NT];
                    for k in 0..nb {
                        let p = w.as_ptr().add(k * 210);
                        let dw = f16_at(p.add(208));
                        let scales = _mm_loadu_si128(p.add(192) as *const __m128i);
                        let scales16 = _mm256_cvtepi8_epi16(scales);
                        let mut u = [_mm256_setzero_si256(); 8];
                        let mut sc = [_mm256_setzero_si256(); 8];
                        for n in 0..2 {
                            let b1 = load(p.add(64 * n));
                            let b2 = load(p.add(64 * n + 32));
                            let bh = load(p.add(128 + 32 * n));
                            let h0 = _mm256_slli_epi16(_mm256_and_si256(bh, m3), 4);
                            let h1 =
                                _mm256_slli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(12)), 2);
                            let h2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                            let h3 =
                                _mm256_srli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(-64)), 2);
                            u[4 * n] = _mm256_or_si256(_mm256_and_si256(b1, m15), h0);
                            u[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(b2, m15), h1);
                            u[4 * n + 2] = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(b1, 4), m15),
                                h2,
                            );
                            u[4 * n + 3] = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(b2, 4), m15),
                                h3,
                            );
                        }
                        for (i, s) in sc.iter_mut().enumerate() {
                            let m =
                                _mm_loadu_si128(super::Q6_SHUFFLE[i].as_ptr() as *const __m128i);
                            *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, m));
                        }
                        for t in 0..NT {
                            let ab = a[t].get_unchecked(k);
                            let q8 = ab.qs.as_ptr() as *const u8;
                            let sums = _mm256_loadu_si256(ab.bsums.as_ptr() as *const __m256i);
                            let offset = _mm256_slli_epi32(_mm256_madd_epi16(sums, scales16), 5);
                            let mut sumi = _mm256_setzero_si256();
                            for i in 0..8 {
                                let p16 = _mm256_maddubs_epi16(u[i], load(q8.add(32 * i)));
                                sumi = $scaled_add(sumi, p16, sc[i]);
                            }
                            sumi = _mm256_sub_epi32(sumi, offset);
                            let d = _mm256_set1_ps(ab.d * dw);
                            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[t]);
                        }
                    }
                    let mut out = [0f32; NT];
                    for t in 0..NT {
                        out[t] = hsum(acc[t]);
                    }
                    out
                }

                /// `Q4_K` (`FIFTH = false`) and `Q5_K`.
                #[target_feature(enable = $features)]
                unsafe fn q45_k<const NT: usize, const FIFTH: bool>(
                    w: &[u8],
                    a: [&[Q8KBlock]; NT],
                ) -> [f32; NT] {
                    let bb = if FIFTH { 176 } else { 144 };
                    let nb = w.len() / bb;
                    let m4 = _mm256_set1_epi8(15);
                    let mut acc = [_mm256_setzero_ps(); NT];
                    // Q4_K: the min terms in 4 f32 lanes; Q5_K: in one f32 (ggml's two ways).
                    let mut acc_m = [_mm_setzero_ps(); NT];
                    let mut summs = [0f32; NT];
                    for k in 0..nb {
                        let p = w.as_ptr().add(k * bb);
                        let (dw, mw) = (f16_at(p), f16_at(p.add(2)));
                        let sm =
                            super::super::scales_mins(std::slice::from_raw_parts(p.add(4), 12));
                        let mins_scales =
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
                        let mins = _mm256_extracti128_si256(mins_scales, 1);
                        let sc128 = _mm256_castsi256_si128(mins_scales);
                        let scales = _mm256_set_m128i(sc128, sc128);
                        let qs = p.add(if FIFTH { 48 } else { 16 });
                        let hbits = if FIFTH {
                            load(p.add(16))
                        } else {
                            _mm256_setzero_si256()
                        };
                        let mut u = [_mm256_setzero_si256(); 8];
                        let mut sc = [_mm256_setzero_si256(); 8];
                        for j in 0..4 {
                            let bits = load(qs.add(32 * j));
                            u[2 * j] = _mm256_and_si256(bits, m4);
                            u[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                        }
                        if FIFTH {
                            let one = _mm256_set1_epi8(1);
                            let mut hb = hbits;
                            for v in u.iter_mut() {
                                let fifth = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
                                *v = _mm256_or_si256(*v, fifth);
                                hb = _mm256_srli_epi16(hb, 1);
                            }
                        }
                        for (j, s) in sc.iter_mut().enumerate() {
                            let m = load(super::K4_SHUFFLE[j].as_ptr());
                            *s = _mm256_shuffle_epi8(scales, m);
                        }
                        for t in 0..NT {
                            let ab = a[t].get_unchecked(k);
                            let q8 = ab.qs.as_ptr() as *const u8;
                            let sums = _mm256_loadu_si256(ab.bsums.as_ptr() as *const __m256i);
                            let pairs = _mm_hadd_epi16(
                                _mm256_castsi256_si128(sums),
                                _mm256_extracti128_si256(sums, 1),
                            );
                            let prod = _mm_madd_epi16(mins, pairs);
                            let dmin = -ab.d * mw;
                            if FIFTH {
                                let s = _mm_hadd_epi32(
                                    _mm_hadd_epi32(prod, _mm_setzero_si128()),
                                    _mm_setzero_si128(),
                                );
                                summs[t] += dmin * _mm_cvtsi128_si32(s) as f32;
                            } else {
                                acc_m[t] = _mm_fmadd_ps(
                                    _mm_set1_ps(dmin),
                                    _mm_cvtepi32_ps(prod),
                                    acc_m[t],
                                );
                            }
                            let mut sumi = _mm256_setzero_si256();
                            for j in 0..8 {
                                let p16 = _mm256_maddubs_epi16(u[j], load(q8.add(32 * j)));
                                sumi = $scaled_add(sumi, p16, sc[j]);
                            }
                            let d = _mm256_set1_ps(ab.d * dw);
                            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[t]);
                        }
                    }
                    let mut out = [0f32; NT];
                    for t in 0..NT {
                        let mut m = acc_m[t];
                        m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                        m = _mm_add_ss(m, _mm_movehdup_ps(m));
                        out[t] = hsum(acc[t]) + if FIFTH { summs[t] } else { _mm_cvtss_f32(m) };
                    }
                    out
                }

                #[target_feature(enable = $features)]
                pub unsafe fn q4_k<const NT: usize>(w: &[u8], a: [&[Q8KBlock]; NT]) -> [f32; NT] {
                    q45_k::<NT, false>(w, a)
                }

                #[target_feature(enable = $features)]
                pub unsafe fn q5_k<const NT: usize>(w: &[u8], a: [&[Q8KBlock]; NT]) -> [f32; NT] {
                    q45_k::<NT, true>(w, a)
                }
            }
        };
    }

    /// `acc + Σ pairs of p·s` (i16 → i32 lanes).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scaled_add_avx2(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn scaled_add_vnni(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, p, s)
    }

    kernels!(avx2, "avx2,fma,f16c", scaled_add_avx2);
    kernels!(
        vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        scaled_add_vnni
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo_random;

    const TYPES: [KType; 5] = [KType::Q4K, KType::Q5K, KType::Q6K, KType::Q5_0, KType::Q5_1];

    /// Random blocks: every quant and scale bit pattern, with small positive fp16 `d` (and
    /// `dmin`), so that any decoding mistake shows.
    fn random_blocks(ty: KType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let bb = ty.block_bytes();
        let mut out = vec![0u8; n * bb];
        for b in out.chunks_exact_mut(bb) {
            for x in b.iter_mut() {
                *x = next() as u8;
            }
            let mut put = |at: usize, v: f32| {
                b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
            };
            let scale = 1e-3 * (1.0 + (next() % 1000) as f32 / 1000.0);
            match ty {
                KType::Q4K | KType::Q5K => {
                    put(0, scale);
                    put(2, scale * 4.0);
                }
                KType::Q6K => put(208, scale),
                KType::Q5_0 => put(0, scale),
                KType::Q5_1 => {
                    put(0, scale);
                    put(2, -scale * 16.0);
                }
            }
        }
        out
    }

    fn reference(ty: KType, bytes: &[u8], x: &[f32], rows: usize, cols: usize) -> Vec<(f64, f64)> {
        let (bb, bv) = (ty.block_bytes(), ty.block_values());
        let tokens = x.len() / cols;
        let mut out = Vec::new();
        for t in 0..tokens {
            for r in 0..rows {
                let (mut want, mut mag) = (0f64, 0f64);
                for b in 0..cols / bv {
                    let off = (r * cols / bv + b) * bb;
                    for (j, w) in dequantize_block(ty, &bytes[off..off + bb])
                        .iter()
                        .enumerate()
                    {
                        let xv = x[t * cols + b * bv + j] as f64;
                        want += w * xv;
                        mag += (w * xv).abs();
                    }
                }
                out.push((want, mag));
            }
        }
        out
    }

    /// Every type on every path this CPU has against the exact product of the dequantized
    /// weights with the unquantized input in f64: the error left is the activations' 8-bit
    /// rounding (≤ max|x|/254 per value), bounded relative to Σ|w·x|.
    #[test]
    fn every_type_and_path_matches_an_f64_reference() {
        // 37 rows: an uneven task split; 13 tokens: tiles of 4 (AVX2) or 8 (AVX-512) and single
        // tokens; 100 tokens of 2048 columns: a prefill in two token chunks (80 + 20).
        for (rows, cols, tokens) in [(37, 512, 13), (16, 2048, 100)] {
            let x = pseudo_random(tokens * cols, 2);
            for ty in TYPES {
                let bytes = random_blocks(ty, rows * cols / ty.block_values(), 1);
                let want = reference(ty, &bytes, &x, rows, cols);
                for isa in Isa::available() {
                    let m = KMatrix::from_bytes(ty, rows, cols, &bytes)
                        .unwrap()
                        .with_isa(isa);
                    assert_eq!(m.isa(), isa);
                    let mut out = vec![0f32; tokens * rows];
                    m.matmul(&x, tokens, &mut out).unwrap();
                    let worst = out
                        .iter()
                        .zip(&want)
                        .map(|(&o, &(w, mag))| (o as f64 - w).abs() / mag)
                        .fold(0f64, f64::max);
                    eprintln!(
                        "{ty:?} {isa:?} {rows}x{cols}x{tokens}: worst relative error {worst:.2e}"
                    );
                    assert!(
                        worst <= 1e-2,
                        "{ty:?} {isa:?} {rows}x{cols}: relative error {worst}"
                    );
                }
            }
        }
    }

    /// The SIMD paths compute the scalar path's integer sums; only the f32 order differs.
    #[test]
    fn simd_paths_agree_with_scalar_closely() {
        let (rows, cols, tokens) = (9, 4096, 5);
        let x = pseudo_random(tokens * cols, 4);
        for ty in TYPES {
            let bytes = random_blocks(ty, rows * cols / ty.block_values(), 3);
            let run = |isa| {
                let m = KMatrix::from_bytes(ty, rows, cols, &bytes)
                    .unwrap()
                    .with_isa(isa);
                let mut out = vec![0f32; tokens * rows];
                m.matmul(&x, tokens, &mut out).unwrap();
                out
            };
            let s = run(Isa::Scalar);
            for isa in Isa::available() {
                for (a, b) in s.iter().zip(run(isa)) {
                    assert!(
                        (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                        "{ty:?} {isa:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// ggml's `quantize_row_q8_K`: `d = 1 / (−127 / max)` with `max` the signed value of
    /// largest magnitude, quants rounded half to even and capped at 127, sums per 16.
    #[test]
    fn activations_quantize_as_ggml_does() {
        let mut x = vec![0f32; QK_K];
        x[0] = -127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = -2.5;
        x[17] = 100.0;
        let mut b = [Q8KBlock::default()];
        quantize_q8k(&x, &mut b);
        // iscale = −127 / −127 = 1: 0.5 → 0, 1.5 → 2, −2.5 → −2.
        assert_eq!(&b[0].qs[..4], &[-127, 0, 2, -2]);
        assert_eq!(b[0].qs[17], 100);
        assert_eq!(b[0].d, 1.0);
        assert_eq!(b[0].bsums[0], -127);
        assert_eq!(b[0].bsums[1], 100);
        // A positive maximum flips the signs: d < 0.
        let y: Vec<f32> = x.iter().map(|v| -v).collect();
        quantize_q8k(&y, &mut b);
        assert_eq!(&b[0].qs[..4], &[-127, 0, 2, -2]);
        assert_eq!(b[0].d, -1.0);
        quantize_q8k(&[0.0; QK_K], &mut b);
        assert_eq!((b[0].d, b[0].qs[0], b[0].bsums[3]), (0.0, 0, 0));
    }

    /// The block layouts against values worked out by hand from ggml's `dequantize_row_*`.
    #[test]
    fn dequantization_follows_ggml_layouts() {
        // Q6_K: value 0 = ql[0] low nibble | (qh[0] & 3) << 4; value 64 = ql[0] high nibble |
        // ((qh[0] >> 4) & 3) << 4; value 160 (second half, l = 0, +32) uses ql[96], qh[32].
        let mut b = vec![0u8; 210];
        b[0] = 0x5A; // low 10, high 5
        b[128] = 0b0010_0011; // bits 0-1: 3, bits 4-5: 2
        b[96] = 0x07;
        b[160] = 0b0000_0100; // bits 2-3: 1
        for (j, s) in b[192..208].iter_mut().enumerate() {
            *s = (j as i8 - 8) as u8;
        }
        b[208..210].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        let v = dequantize_block(KType::Q6K, &b);
        assert_eq!(v[0], 0.5 * -8.0 * ((10 | 3 << 4) as f64 - 32.0));
        assert_eq!(v[64], 0.5 * -4.0 * ((5 | 2 << 4) as f64 - 32.0));
        // Value 160: half 1 (scales 8..16), position 32 → scale index 8 + 2 = 10 → 2.
        assert_eq!(v[160], 0.5 * 2.0 * ((7 | 1 << 4) as f64 - 32.0));
        // Q4_K: scale 2 and min 2 from bytes 2 and 6 (low 6 bits); scales 4.. from the packed
        // high bits: scale 4 = (s[8] & 15) | (s[0] >> 6) << 4.
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        b[4 + 2] = 5;
        b[4 + 6] = 3;
        b[4] = 0b1100_0000; // scale 0 = 0, scale 4's high bits = 3
        b[4 + 8] = 0x29; // scale 4 low = 9, min 4 low = 2
        b[16 + 32] = 0xC4; // values 64 (low nibble 4) and 96 (high nibble 12) of sub-blocks 2, 3
        b[16 + 64] = 0x0B; // value 128 (sub-block 4): 11
        let v = dequantize_block(KType::Q4K, &b);
        assert_eq!(v[64], 5.0 * 4.0 - 0.25 * 3.0);
        assert_eq!(v[128], (9 | 3 << 4) as f64 * 11.0 - 0.25 * 2.0);
        // Q5_K: the fifth bit of value 64 is bit 2 of qh[0].
        let mut c = vec![0u8; 176];
        c[..16].copy_from_slice(&b[..16]);
        c[48..].copy_from_slice(&b[16..]);
        c[16] = 0b100;
        let v5 = dequantize_block(KType::Q5K, &c);
        assert_eq!(v5[64], 5.0 * 20.0 - 0.25 * 3.0);
        assert_eq!(v5[128], v[128]);
    }

    /// A group of mixed types (both activation formats) equals the separate products, for a
    /// decode step and a prefill with tiles and a remainder.
    #[test]
    fn mixed_group_equals_separate_products() {
        let cols = 512;
        let mats: Vec<KMatrix> = [(KType::Q5_0, 21), (KType::Q6K, 16), (KType::Q4K, 8)]
            .into_iter()
            .enumerate()
            .map(|(i, (ty, rows))| {
                let b = random_blocks(ty, rows * cols / ty.block_values(), i as u64 + 5);
                KMatrix::from_bytes(ty, rows, cols, &b).unwrap()
            })
            .collect();
        let refs: Vec<&KMatrix> = mats.iter().collect();
        for tokens in [1, 7] {
            let x = pseudo_random(tokens * cols, 30 + tokens as u32);
            let mut outs: Vec<Vec<f32>> =
                mats.iter().map(|m| vec![0f32; tokens * m.rows]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            kmatmul_group(&refs, &x, tokens, &mut views).unwrap();
            for (m, o) in mats.iter().zip(&outs) {
                let mut one = vec![0f32; tokens * m.rows];
                m.matmul(&x, tokens, &mut one).unwrap();
                assert_eq!(o, &one, "{:?} {tokens}", m.ktype());
            }
        }
    }

    /// `Q5_0` and `Q5_1` layouts: value `j` is the low nibble of byte `j` with bit `j` of the
    /// 32-bit field as fifth bit, value `16 + j` the high nibble with bit `16 + j`.
    #[test]
    fn five_bit_layouts_follow_ggml() {
        let mut b = vec![0u8; 22];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..6].copy_from_slice(&(1u32 << 3 | 1 << 19).to_le_bytes());
        b[6 + 3] = 0x72; // value 3: 2 | 16; value 19: 7 | 16
        b[6 + 4] = 0x09; // value 4: 9, no fifth bit; value 20: 0
        let v = dequantize_block(KType::Q5_0, &b);
        assert_eq!((v[3], v[19], v[4], v[20]), (1.0, 3.5, -3.5, -8.0));
        let mut c = vec![0u8; 24];
        c[0..2].copy_from_slice(&b[0..2]);
        c[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        c[4..].copy_from_slice(&b[2..]);
        let v = dequantize_block(KType::Q5_1, &c);
        assert_eq!((v[3], v[19], v[4], v[20]), (8.0, 10.5, 3.5, -1.0));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(KMatrix::from_bytes(KType::Q6K, 2, 255, &[0; 420]).is_err());
        assert!(KMatrix::from_bytes(KType::Q6K, 2, 256, &[0; 419]).is_err());
        let m = KMatrix::from_bytes(KType::Q4K, 2, 256, &[0; 288]).unwrap();
        assert!(m.matmul(&[0.0; 255], 1, &mut [0.0; 2]).is_err());
        assert!(m.matmul(&[0.0; 256], 1, &mut [0.0; 3]).is_err());
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8; 300]);
        assert!(KMatrix::from_shared(KType::Q4K, 2, 256, owner.clone(), 20..308).is_err());
        assert!(KMatrix::from_shared(KType::Q4K, 2, 256, owner, 12..300).is_ok());
    }
}
