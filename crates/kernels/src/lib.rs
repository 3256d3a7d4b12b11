//! camelid's own CPU kernels, for the places where measurement showed candle's to be the
//! bottleneck. Today: the quantized matrix product for GGUF `Q4_1` weights, which candle runs
//! through a scalar loop (12× slower than llama.cpp on SmolLM2-135M).
//!
//! Numerics follow ggml's CPU backend (activations quantized to `Q8_1` blocks with
//! round-half-even, `s = fp16(d · Σq)`), so logits agree with llama.cpp on the same file.
//! The SIMD path is chosen at run time; the scalar path computes the same thing and is always
//! tested. This crate knows nothing about tensors or models: it takes slices and returns slices.

mod q4_1;

pub use q4_1::{BlockQ4_1, BlockQ8_1};

use rayon::prelude::*;

/// A parallel loop: run the closure over disjoint ranges covering `0..n`.
pub type ParallelFor = dyn Fn(usize, &(dyn Fn(std::ops::Range<usize>) + Sync)) + Sync;

/// The default [`ParallelFor`]: rayon's global pool, 16 rows a task.
pub fn rayon_for(n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    const ROWS_PER_TASK: usize = 16;
    (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|c| f(c * ROWS_PER_TASK..((c + 1) * ROWS_PER_TASK).min(n)));
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` must be in bounds and written by one task only.
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// Instruction sets a kernel may use, detected once per call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// A `[rows, cols]` weight matrix of `Q4_1` blocks, each row `cols / 32` blocks.
pub struct Q4_1Matrix {
    pub rows: usize,
    pub cols: usize,
    blocks: Vec<BlockQ4_1>,
    isa: Isa,
}

#[derive(Debug)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

impl Q4_1Matrix {
    /// From the raw GGUF bytes of a `Q4_1` tensor.
    pub fn from_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(q4_1::QK) {
            return Err(KernelError(format!(
                "Q4_1 rows must be a multiple of {} values, got {cols}",
                q4_1::QK
            )));
        }
        let n = rows * cols / q4_1::QK;
        if bytes.len() != n * std::mem::size_of::<BlockQ4_1>() {
            return Err(KernelError(format!(
                "Q4_1 [{rows}, {cols}] needs {} bytes, got {}",
                n * std::mem::size_of::<BlockQ4_1>(),
                bytes.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            blocks: q4_1::blocks_from_bytes(bytes),
            isa: Isa::detect(),
        })
    }

    /// Forces an instruction set (tests compare every path).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        if isa == Isa::Avx2 && Isa::detect() != Isa::Avx2 {
            return self;
        }
        self.isa = isa;
        self
    }

    /// `out[t][r] = Σ_c w[r][c] · x[t][c]` for `tokens` rows of `x` (`[tokens, cols]`),
    /// writing `[tokens, rows]`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_on(x, tokens, out, &rayon_for)
    }

    /// [`Self::matmul`] on a caller's thread pool: `par(n, f)` must call `f` on disjoint
    /// ranges covering `0..n`, possibly from several threads, and return when all are done.
    pub fn matmul_on(
        &self,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        par: &ParallelFor,
    ) -> Result<(), KernelError> {
        if x.len() != tokens * self.cols || out.len() != tokens * self.rows {
            return Err(KernelError(format!(
                "matmul shapes: x has {} values for {tokens}×{}, out has {} for {tokens}×{}",
                x.len(),
                self.cols,
                out.len(),
                self.rows
            )));
        }
        let per_row = self.cols / q4_1::QK;
        let xq: Vec<BlockQ8_1> = x
            .chunks_exact(self.cols)
            .flat_map(q4_1::quantize_q8_1)
            .collect();
        let isa = self.isa;
        let dot = |row: usize, t: usize| {
            let w = &self.blocks[row * per_row..(row + 1) * per_row];
            let a = &xq[t * per_row..(t + 1) * per_row];
            q4_1::dot(isa, w, a)
        };
        // Tasks own disjoint weight rows, and each reads its rows' blocks once for all tokens;
        // `out[t][row]` of different rows never collide, so they write `out` in place.
        let rows = self.rows;
        let dst = SharedOut(out.as_mut_ptr());
        let work = |range: std::ops::Range<usize>| {
            for row in range {
                for t in 0..tokens {
                    // SAFETY: `row` belongs to this task alone, and `t * rows + row` is in
                    // bounds (`out.len() == tokens * rows` was checked above).
                    unsafe { dst.write(t * rows + row, dot(row, t)) };
                }
            }
        };
        par(rows, &work);
        Ok(())
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}
