//! F16 weights (GGUF `F16`) against f32 activations: each weight is converted in registers
//! (`vcvtph2ps`, F16C or AVX-512) and multiplied in f32, so a decode reads 2 bytes per weight
//! instead of the 4 of an f32 copy. A model's matrices are copied at load from the file mapping
//! into 2 MiB pages ([`F16Matrix::from_mapped`]); they can also be read in place.
//!
//! Decode (one token) takes one row at a time with 8 independent accumulators, so each thread
//! reads one sequential stream that the hardware prefetchers follow from row to row. Prefill on
//! AVX-512 converts each block of 32 rows once into an f32 panel (`[col][32]`) and runs tiles of
//! 12 tokens over it as outer products (two panel vectors times a broadcast input value per
//! token, 24 accumulators, no horizontal sums). Elsewhere rows are taken 4 at a time against
//! tiles of 2 tokens, in row blocks and token chunks that stay in L2.

use crate::{Data, Isa, KernelError, SharedOut};
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;

/// Rows per kernel call.
const ROWS: usize = 4;
/// Tokens per kernel call in prefill: 8 accumulators (with 4 tokens the compiler spilled them).
const TILE: usize = 2;
/// Bytes of weights per row block (kept in L2 while the tokens pass).
const ROW_BLOCK_BYTES: usize = 128 * 1024;
/// Rows per f32 panel of the AVX-512 prefill (two vectors of 16).
const PANEL_ROWS: usize = 32;
/// Tokens per panel tile: 24 accumulators, 2 panel vectors and a broadcast of 32 registers.
const PANEL_TILE: usize = 12;
/// Below this many tokens the panel's conversion costs more than it saves.
const PANEL_MIN_TOKENS: usize = 16;

/// The token tiles of a panel product, `(first token, tokens)`: 12 at a time, then 4, then 1.
fn panel_tiles(tokens: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut t = 0;
    std::iter::from_fn(move || {
        let nt = match tokens - t {
            0 => return None,
            n if n >= PANEL_TILE => PANEL_TILE,
            n if n >= 4 => 4,
            _ => 1,
        };
        t += nt;
        Some((t - nt, nt))
    })
}

thread_local! {
    /// The f32 panel of the AVX-512 prefill, reused between calls.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The transposed input tiles of the AVX-512 prefill, reused between calls.
    static TILES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Contiguous spans of rows per thread in decode (a little slack for a busy core).
const DECODE_SPANS_PER_THREAD: usize = 2;
/// Bytes of activations per token chunk.
const TOKEN_CHUNK_BYTES: usize = 128 * 1024;

/// A `[rows, cols]` matrix of fp16 values, row-major as in the file.
pub struct F16Matrix {
    pub rows: usize,
    pub cols: usize,
    data: Data,
    isa: Isa,
}

impl F16Matrix {
    /// From the raw little-endian fp16 bytes of a tensor (copied).
    pub fn from_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::check(rows, cols, bytes.len())?;
        Ok(Self {
            rows,
            cols,
            data: Data::Owned(bytes.to_vec()),
            isa: Isa::detect(),
        })
    }

    /// Reads the values in place at `range` of `owner` (a mapped file): no copy.
    pub fn from_shared(
        rows: usize,
        cols: usize,
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Result<Self, KernelError> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(KernelError(format!(
                "F16 [{rows}, {cols}]: bytes {range:?} are outside the {len} available"
            )));
        }
        Self::check(rows, cols, range.len())?;
        Ok(Self {
            rows,
            cols,
            data: Data::Shared(owner, range),
            isa: Isa::detect(),
        })
    }

    /// [`F16Matrix::from_shared`] copied into memory of its own on 2 MiB pages (see
    /// `packed::Buffer`), so that a decode streaming through it takes one TLB entry per 2 MiB
    /// instead of per 4 KiB of the file mapping; the mapped source pages are then released from
    /// this process's resident set (they stay in the page cache).
    ///
    /// # Safety
    /// `owner` must be a mapping of a file (not anonymous or heap memory, whose released pages
    /// would read back as zeros) that nobody writes through.
    pub unsafe fn from_mapped(
        rows: usize,
        cols: usize,
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Result<Self, KernelError> {
        let mut m = Self::from_shared(rows, cols, owner, range)?;
        let src = m.data.bytes();
        let mut copy = crate::packed::Buffer::zeroed(src.len());
        copy.as_mut_slice()
            .par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        // SAFETY: the caller guarantees a read-only file mapping.
        unsafe { m.data.release() };
        m.data = Data::Packed(copy);
        Ok(m)
    }

    fn check(rows: usize, cols: usize, len: usize) -> Result<(), KernelError> {
        if len != rows * cols * 2 {
            return Err(KernelError(format!(
                "F16 [{rows}, {cols}] needs {} bytes, got {len}",
                rows * cols * 2
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

    /// `out[t][r] = Σ_c w[r][c] · x[t][c]` for `tokens` rows of `x` (`[tokens, cols]`),
    /// writing `[tokens, rows]`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if x.len() != tokens * self.cols || out.len() != tokens * self.rows {
            return Err(KernelError(format!(
                "matmul shapes: x has {} values for {tokens}×{}, out has {} for {tokens}×{}",
                x.len(),
                self.cols,
                out.len(),
                self.rows
            )));
        }
        if tokens == 0 {
            return Ok(());
        }
        let dst = SharedOut(out.as_mut_ptr());
        let block_rows = (ROW_BLOCK_BYTES / (2 * self.cols)).max(1).div_ceil(ROWS) * ROWS;
        let blocks = self.rows.div_ceil(block_rows);
        let work = |b: usize| {
            let rows = b * block_rows..((b + 1) * block_rows).min(self.rows);
            self.run(rows, x, tokens, dst);
        };
        let threads = rayon::current_num_threads();
        if tokens == 1 {
            // Decode: one row at a time (one sequential stream through the matrix, which the
            // hardware prefetchers follow across rows), in a few contiguous spans per thread.
            let spans = if threads == 1 || self.rows < 256 {
                1
            } else {
                threads * DECODE_SPANS_PER_THREAD
            };
            let per = self.rows.div_ceil(spans);
            let span = |s: usize| {
                let rows = s * per..((s + 1) * per).min(self.rows);
                self.rows_decode(rows, x, dst);
            };
            if spans == 1 {
                span(0);
            } else {
                (0..spans).into_par_iter().for_each(span);
            }
        } else if self.isa == Isa::Avx512Vnni && tokens >= PANEL_MIN_TOKENS {
            #[cfg(target_arch = "x86_64")]
            {
                // Prefill: each block of 32 rows is converted once into an f32 panel, and every
                // token passes over it in tiles of 12 (outer products, no horizontal sums).
                // The input in tiles of tokens, each transposed (`[col][tile]`), so that a
                // tile's broadcasts read one contiguous stream (12 rows 8 KiB apart would all
                // fall in one L1 set).
                let mut xt = TILES.with(|b| std::mem::take(&mut *b.borrow_mut()));
                xt.resize(tokens * self.cols, 0.0);
                for (t, nt) in panel_tiles(tokens) {
                    let tile = &mut xt[t * self.cols..(t + nt) * self.cols];
                    for (c, v) in tile.chunks_exact_mut(nt).enumerate() {
                        for (k, v) in v.iter_mut().enumerate() {
                            *v = x[(t + k) * self.cols + c];
                        }
                    }
                }
                let panels = self.rows.div_ceil(PANEL_ROWS);
                let panel = |b: usize| self.run_panel(b * PANEL_ROWS, &xt, tokens, dst);
                if threads == 1 {
                    (0..panels).for_each(panel);
                } else {
                    (0..panels).into_par_iter().for_each(panel);
                }
                TILES.with(|b| *b.borrow_mut() = xt);
            }
        } else if threads == 1 || self.rows * tokens < 256 {
            (0..blocks).for_each(work);
        } else {
            (0..blocks).into_par_iter().for_each(work);
        }
        Ok(())
    }

    /// Rows `r0..r0 + 32` (fewer at the end) for every token on AVX-512: the rows are converted
    /// to f32 once into a panel laid out `[col][32 rows]`, then tiles of 12 tokens run over it,
    /// each step two panel vectors (the 32 rows at one column) times one broadcast input value
    /// per token into 24 accumulators.
    #[cfg(target_arch = "x86_64")]
    fn run_panel(&self, r0: usize, xt: &[f32], tokens: usize, dst: SharedOut) {
        let (cols, w) = (self.cols, self.data.bytes());
        let nr = (self.rows - r0).min(PANEL_ROWS);
        PANEL.with(|p| {
            let mut panel = p.borrow_mut();
            // Not cleared: rows `nr..32` of a last partial panel are computed but never stored.
            panel.resize(cols * PANEL_ROWS, 0.0);
            let rows = &w[r0 * cols * 2..(r0 + nr) * cols * 2];
            // SAFETY: AVX-512 F is part of the detected set (`isa`); `rows` holds `nr` rows.
            unsafe { x86::fill_panel(rows, nr, cols, &mut panel) };
            for (t, nt) in panel_tiles(tokens) {
                let tile = &xt[t * cols..(t + nt) * cols];
                let (out, stride) = (dst.0, self.rows);
                // SAFETY: AVX-512 F is detected; the panel holds `cols` columns of 32 rows, the
                // tile `nt` tokens' `cols` values, and rows `r0..r0 + nr` of the output belong
                // to this task.
                unsafe {
                    match nt {
                        PANEL_TILE => x86::panel_tile::<PANEL_TILE>(
                            &panel, tile, t, cols, out, stride, r0, nr,
                        ),
                        4 => x86::panel_tile::<4>(&panel, tile, t, cols, out, stride, r0, nr),
                        _ => x86::panel_tile::<1>(&panel, tile, t, cols, out, stride, r0, nr),
                    }
                }
            }
        });
    }

    /// Rows `rows` against one token, each row's dot product in one pass.
    fn rows_decode(&self, rows: std::ops::Range<usize>, x: &[f32], dst: SharedOut) {
        let (cols, w) = (self.cols, self.data.bytes());
        for r in rows {
            let row = &w[r * cols * 2..(r + 1) * cols * 2];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is only ever a set detected on this CPU; `row` has `cols` values.
            let v = unsafe {
                match self.isa {
                    Isa::Avx512Vnni => x86::row_avx512(row, x),
                    Isa::Avx2 => x86::row_avx2(row, x),
                    Isa::Scalar => dot_scalar(row, x),
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let v = dot_scalar(row, x);
            // SAFETY: row `r` belongs to this task alone; `r < rows` (shapes checked).
            unsafe { dst.write(r, v) };
        }
    }

    /// Rows `rows` for every token: token chunks over groups of 4 rows.
    fn run(&self, rows: std::ops::Range<usize>, x: &[f32], tokens: usize, dst: SharedOut) {
        let cols = self.cols;
        let w = self.data.bytes();
        let chunk = (TOKEN_CHUNK_BYTES / (4 * cols)).max(4);
        let mut c = 0;
        while c < tokens {
            let c_end = (c + chunk).min(tokens);
            let mut r = rows.start;
            while r < rows.end {
                let nr = (rows.end - r).min(ROWS);
                let mut t = c;
                while t < c_end {
                    let nt = if c_end - t >= TILE { TILE } else { 1 };
                    let mut res = [[0f32; ROWS]; TILE];
                    let rr: [&[u8]; ROWS] = std::array::from_fn(|i| {
                        let row = r + i.min(nr - 1);
                        &w[row * cols * 2..(row + 1) * cols * 2]
                    });
                    if nt == TILE {
                        let xs = std::array::from_fn(|k| &x[(t + k) * cols..(t + k + 1) * cols]);
                        res = self.tile::<TILE>(rr, xs);
                    } else {
                        res[0] = self.tile::<1>(rr, [&x[t * cols..(t + 1) * cols]])[0];
                    }
                    for (k, row) in res.iter().enumerate().take(nt) {
                        for (i, &v) in row.iter().enumerate().take(nr) {
                            // SAFETY: rows `r..r + nr` belong to this task alone; in bounds.
                            unsafe { dst.write((t + k) * self.rows + r + i, v) };
                        }
                    }
                    t += nt;
                }
                r += nr;
            }
            c = c_end;
        }
    }

    fn tile<const NT: usize>(&self, w: [&[u8]; ROWS], x: [&[f32]; NT]) -> [[f32; ROWS]; NT] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a set detected on this CPU; every row has `cols` values.
        unsafe {
            match self.isa {
                Isa::Avx512Vnni => return x86::tile_avx512(w, x),
                Isa::Avx2 => return x86::tile_avx2(w, x),
                Isa::Scalar => {}
            }
        }
        std::array::from_fn(|t| std::array::from_fn(|r| dot_scalar(w[r], x[t])))
    }
}

/// Σ of one fp16 row with one f32 row.
fn dot_scalar(w: &[u8], x: &[f32]) -> f32 {
    w.chunks_exact(2)
        .zip(x)
        .map(|(b, &x)| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32() * x)
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot_scalar, ROWS};
    use std::arch::x86_64::*;

    /// `nr` fp16 rows of `cols` → an f32 panel `[cols][32]` (rows `nr..32` stay zero). Taken
    /// 16 columns at a time, so that the 16 panel lines written stay in L1 over the rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fill_panel(w: &[u8], nr: usize, cols: usize, panel: &mut [f32]) {
        debug_assert!(w.len() == nr * cols * 2 && panel.len() >= cols * 32 && nr <= 32);
        let (wp, pp) = (w.as_ptr(), panel.as_mut_ptr());
        let mut c = 0;
        let mut tmp = [0f32; 16];
        while c + 16 <= cols {
            for r in 0..nr {
                let v = _mm256_loadu_si256(wp.add(2 * (r * cols + c)) as *const __m256i);
                _mm512_storeu_ps(tmp.as_mut_ptr(), _mm512_cvtph_ps(v));
                for (j, &v) in tmp.iter().enumerate() {
                    *pp.add((c + j) * 32 + r) = v;
                }
            }
            c += 16;
        }
        for c in c..cols {
            for r in 0..nr {
                let b = [w[2 * (r * cols + c)], w[2 * (r * cols + c) + 1]];
                panel[c * 32 + r] = half::f16::from_bits(u16::from_le_bytes(b)).to_f32();
            }
        }
    }

    /// Tokens `t0..t0 + NT` against a panel (`[cols][32]` f32), their inputs in `x` as
    /// `[cols][NT]`: `out[(t0 + t) * stride + r0 + r]` for `r < nr`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel_tile<const NT: usize>(
        panel: &[f32],
        x: &[f32],
        t0: usize,
        cols: usize,
        out: *mut f32,
        stride: usize,
        r0: usize,
        nr: usize,
    ) {
        debug_assert!(panel.len() >= cols * 32 && x.len() == NT * cols);
        let mut lo = [_mm512_setzero_ps(); NT];
        let mut hi = [_mm512_setzero_ps(); NT];
        let pp = panel.as_ptr();
        let xp = x.as_ptr();
        for c in 0..cols {
            let a = _mm512_loadu_ps(pp.add(32 * c));
            let b = _mm512_loadu_ps(pp.add(32 * c + 16));
            panel_token!(NT, t, {
                let v = _mm512_set1_ps(*xp.add(c * NT + t));
                lo[t] = _mm512_fmadd_ps(a, v, lo[t]);
                hi[t] = _mm512_fmadd_ps(b, v, hi[t]);
            });
        }
        let mlo: __mmask16 = if nr >= 16 { 0xFFFF } else { (1u16 << nr) - 1 };
        let mhi: __mmask16 = if nr >= 32 {
            0xFFFF
        } else if nr > 16 {
            (1u16 << (nr - 16)) - 1
        } else {
            0
        };
        for t in 0..NT {
            let o = out.add((t0 + t) * stride + r0);
            _mm512_mask_storeu_ps(o, mlo, lo[t]);
            _mm512_mask_storeu_ps(o.add(16), mhi, hi[t]);
        }
    }

    /// Repeats `body` for `t` = 0..12 below `NT`, so each accumulator has a constant index and
    /// stays in a register.
    macro_rules! panel_token {
        ($nt:expr, $t:ident, $body:block) => {
            panel_token!(@ $nt, $t, $body, 0 1 2 3 4 5 6 7 8 9 10 11)
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
    use panel_token;

    /// One row against one token: 8 independent accumulators over 128 values per step, so
    /// the loads of 256 bytes of weights are in flight together.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_avx512(w: &[u8], x: &[f32]) -> f32 {
        let cols = x.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 8];
        let mut c = 0;
        while c + 128 <= cols {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = c + 16 * k;
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(2 * at) as *const __m256i));
                *acc = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(at)), *acc);
            }
            c += 128;
        }
        while c + 16 <= cols {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(2 * c) as *const __m256i));
            acc[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(c)), acc[0]);
            c += 16;
        }
        let a = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])),
            _mm512_add_ps(_mm512_add_ps(acc[4], acc[5]), _mm512_add_ps(acc[6], acc[7])),
        );
        let mut out = _mm512_reduce_add_ps(a);
        if c < cols {
            out += dot_scalar(&w[2 * c..], &x[c..]);
        }
        out
    }

    /// [`row_avx512`] on 256-bit registers: 8 accumulators over 64 values per step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_avx2(w: &[u8], x: &[f32]) -> f32 {
        let cols = x.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut c = 0;
        while c + 64 <= cols {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = c + 8 * k;
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * at) as *const __m128i));
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(at)), *acc);
            }
            c += 64;
        }
        while c + 8 <= cols {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * c) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(c)), acc[0]);
            c += 8;
        }
        let a = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
            _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])),
        );
        let mut s = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        let mut out = _mm_cvtss_f32(s);
        if c < cols {
            out += dot_scalar(&w[2 * c..], &x[c..]);
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512<const NT: usize>(
        w: [&[u8]; ROWS],
        x: [&[f32]; NT],
    ) -> [[f32; ROWS]; NT] {
        let cols = x[0].len();
        let wp: [*const u8; ROWS] = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
        let mut xp = [std::ptr::null::<f32>(); NT];
        for t in 0..NT {
            xp[t] = x[t].as_ptr();
        }
        let mut acc = [[_mm512_setzero_ps(); ROWS]; NT];
        let mut c = 0;
        while c + 16 <= cols {
            let mut wv = [_mm512_setzero_ps(); ROWS];
            for r in 0..ROWS {
                wv[r] = _mm512_cvtph_ps(_mm256_loadu_si256(wp[r].add(2 * c) as *const __m256i));
            }
            for t in 0..NT {
                let xv = _mm512_loadu_ps(xp[t].add(c));
                for r in 0..ROWS {
                    acc[t][r] = _mm512_fmadd_ps(wv[r], xv, acc[t][r]);
                }
            }
            c += 16;
        }
        let mut out = [[0f32; ROWS]; NT];
        for t in 0..NT {
            for r in 0..ROWS {
                out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
                if c < cols {
                    out[t][r] += dot_scalar(&w[r][2 * c..], &x[t][c..]);
                }
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2<const NT: usize>(
        w: [&[u8]; ROWS],
        x: [&[f32]; NT],
    ) -> [[f32; ROWS]; NT] {
        let cols = x[0].len();
        let wp: [*const u8; ROWS] = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
        let mut xp = [std::ptr::null::<f32>(); NT];
        for t in 0..NT {
            xp[t] = x[t].as_ptr();
        }
        let mut acc = [[_mm256_setzero_ps(); ROWS]; NT];
        let mut c = 0;
        while c + 8 <= cols {
            let mut wv = [_mm256_setzero_ps(); ROWS];
            for r in 0..ROWS {
                wv[r] = _mm256_cvtph_ps(_mm_loadu_si128(wp[r].add(2 * c) as *const __m128i));
            }
            for t in 0..NT {
                let xv = _mm256_loadu_ps(xp[t].add(c));
                for r in 0..ROWS {
                    acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
                }
            }
            c += 8;
        }
        let mut out = [[0f32; ROWS]; NT];
        for t in 0..NT {
            for r in 0..ROWS {
                let v = acc[t][r];
                let mut s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
                s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                s = _mm_add_ss(s, _mm_movehdup_ps(s));
                out[t][r] = _mm_cvtss_f32(s);
                if c < cols {
                    out[t][r] += dot_scalar(&w[r][2 * c..], &x[t][c..]);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo_random;

    /// Every path against the f64 product of the fp16 values with the input: only f32
    /// rounding is left (≤ a few ulps of Σ|w·x| per sum).
    #[test]
    fn every_path_matches_an_f64_reference() {
        // 13 rows: groups of 4 and a partial one; 100 columns: a tail after the vectors;
        // 6 tokens: tiles of 2; 2048 columns and 45 tokens: two token chunks and a single.
        // One token (decode, row by row): 1000 columns are 7 steps of 128, 6 of 16 and a tail
        // of 8; 300 rows are split between threads.
        for (rows, cols, tokens) in [
            (13, 100, 6),
            (9, 2048, 45),
            (256, 64, 3),
            (13, 100, 1),
            (300, 1000, 1),
            (4, 2048, 1),
            // AVX-512 prefill panels: 32 rows and a partial panel of 8 (or 6 beyond 16); 30
            // and 17 tokens: tiles of 12 and single tokens.
            (40, 100, 30),
            (54, 64, 17),
        ] {
            let w: Vec<u8> = pseudo_random(rows * cols, 1)
                .into_iter()
                .flat_map(|v| f16::from_f32(v).to_bits().to_le_bytes())
                .collect();
            let x = pseudo_random(tokens * cols, 2);
            for isa in Isa::available() {
                let m = F16Matrix::from_bytes(rows, cols, &w).unwrap().with_isa(isa);
                assert_eq!(m.isa(), isa);
                let mut out = vec![0f32; tokens * rows];
                m.matmul(&x, tokens, &mut out).unwrap();
                for t in 0..tokens {
                    for r in 0..rows {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for c in 0..cols {
                            let b = &w[(r * cols + c) * 2..];
                            let wv = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64();
                            want += wv * x[t * cols + c] as f64;
                            mag += (wv * x[t * cols + c] as f64).abs();
                        }
                        let got = out[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag,
                            "{isa:?} {rows}x{cols} t{t} r{r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A matrix copied out of a file mapping (its source pages released) multiplies like one
    /// built from the same bytes, and the mapping still reads the file's bytes.
    #[test]
    fn mapped_matrix_is_copied_and_equals_owned() {
        let (rows, cols) = (48, 2048);
        let w: Vec<u8> = pseudo_random(rows * cols, 3)
            .into_iter()
            .flat_map(|v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let mut file = vec![0x11u8; 4000];
        file.extend_from_slice(&w);
        file.extend_from_slice(&[0x22; 100]);
        let path = std::env::temp_dir().join(format!("camelid-f16-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        let map = unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()) }.unwrap();
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(map);
        // SAFETY: `owner` is a read-only file mapping.
        let m = unsafe { F16Matrix::from_mapped(rows, cols, owner.clone(), 4000..4000 + w.len()) }
            .unwrap();
        assert!((*owner).as_ref() == &file[..]);
        let owned = F16Matrix::from_bytes(rows, cols, &w).unwrap();
        for tokens in [1, 20] {
            let x = pseudo_random(tokens * cols, 4);
            let (mut a, mut b) = (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
            m.matmul(&x, tokens, &mut a).unwrap();
            owned.matmul(&x, tokens, &mut b).unwrap();
            assert_eq!(a, b);
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(F16Matrix::from_bytes(2, 4, &[0; 15]).is_err());
        let m = F16Matrix::from_bytes(2, 4, &[0; 16]).unwrap();
        assert!(m.matmul(&[0.0; 7], 2, &mut [0.0; 4]).is_err());
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8; 16]);
        assert!(F16Matrix::from_shared(2, 4, owner, 1..17).is_err());
    }
}
