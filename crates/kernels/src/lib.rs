//! camelid's own CPU kernels, for the places where measurement showed candle's to be the
//! bottleneck: the quantized matrix products for GGUF `Q4_0`, `Q4_1` and `Q8_0` weights
//! (candle runs `Q4_1` through a scalar loop, and its `Q4_0`/`Q8_0` paths use one thread pool
//! hand-off per product and no token tiling).
//!
//! Numerics follow ggml's CPU backend (activations quantized to 8 bits with round-half-even and
//! fp16 scales, `s = fp16(d · Σq)` for `Q4_1`), so logits agree with llama.cpp on the same file.
//! The SIMD path (AVX2, or AVX-512 VNNI) is chosen at run time; the scalar path computes the
//! same thing and is always tested. Several matrices that read the same input (q/k/v, gate/up)
//! run in one parallel region on one quantized copy of the input ([`matmul_group`]).
//!
//! `Q4_0`, `Q4_1` and `Q8_0` matrices are repacked at load into groups of 8 rows with interleaved
//! blocks (`packed.rs`): one SIMD lane per row, so decode needs no horizontal sums and prefill
//! multiplies each unpacked weight vector with a tile of tokens. [`F16Matrix`] multiplies fp16
//! weights, and [`attention`] runs one sequence's attention a query row at a time on the cache
//! in place. Packed and F16 matrices live in 2 MiB pages (`packed::Buffer`). [`KMatrix`] runs
//! GGUF `Q4_K`, `Q5_K`, `Q6_K`, `Q5_0` and `Q5_1` weights in place, as ggml computes them
//! (`kquants.rs`, `q5.rs`). [`expf`] computes `e^x` over slices with exactly the bits of the
//! platform's `expf` (glibc's algorithm in AVX2 or AVX-512), for SwiGLU's `silu` in the
//! model's row kernels, which must equal candle's.
//! This crate knows nothing about tensors or models: it takes slices and returns slices.

mod attention;
pub mod expf;
mod f16;
pub mod kquants;
mod many;
mod packed;
mod q5;
mod quant;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use attention::{attention, AttentionShape, HeadRows};
pub use f16::F16Matrix;
pub use kquants::{kmatmul_group, KMatrix, KType};
pub use many::matmul_group_many;
pub use quant::{
    dequantize_block, dot_scalar, quantize_into, quantize_weights, quantize_with_sums, ActBlock,
    QType, QK,
};

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

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

/// Instruction sets a kernel may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The AVX2 set plus AVX-512 VNNI (`vpdpbusd`) on 256-bit registers.
    Avx512Vnni,
}

impl Isa {
    /// The best set this CPU supports (detected once).
    pub fn detect() -> Self {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Self::available();
            all[all.len() - 1]
        })
    }

    /// Every set this CPU supports, scalar first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        v
    }
}

#[derive(Debug)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

/// A `[rows, cols]` weight matrix of GGUF blocks, each row `cols / 32` blocks, as in the file,
/// or (rows in groups of 8, on the SIMD paths) repacked at load into groups
/// of 8 rows whose blocks are interleaved (see `packed.rs`).
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    ty: QType,
    data: Data,
    /// `data` holds the packed layout.
    packed: bool,
    isa: Isa,
}

/// Bytes the matrix owns, or bytes owned by someone else (a mapped file) that it reads in place.
enum Data {
    Owned(Vec<u8>),
    /// Repacked blocks (see [`packed::Buffer`]).
    Packed(packed::Buffer),
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>, std::ops::Range<usize>),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Packed(b) => b.as_slice(),
            Data::Shared(owner, range) => &(**owner).as_ref()[range.clone()],
        }
    }

    /// Tells the kernel that the mapped source pages are no longer needed by this process, so
    /// that they leave its resident set.
    ///
    /// # Safety
    /// The bytes must be a read-only file mapping (see [`QMatrix::from_mapped`]).
    unsafe fn release(&self) {
        #[cfg(target_os = "linux")]
        if let Data::Shared(..) = self {
            let b = self.bytes();
            let page = 4096;
            let start = (b.as_ptr() as usize).div_ceil(page) * page;
            let end = (b.as_ptr() as usize + b.len()) / page * page;
            if end > start {
                // SAFETY: the range lies inside a read-only file mapping (the caller's promise);
                // MADV_DONTNEED on it only drops this process's page-table entries, and a later
                // access reads the same bytes from the file again. Failure is harmless.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                }
            }
        }
    }
}

impl QMatrix {
    /// From the raw GGUF bytes of a tensor of type `ty` (copied).
    pub fn from_bytes(
        ty: QType,
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
            packed: false,
            isa: Isa::detect(),
        }
        .repacked())
    }

    /// Reads the blocks in place at `range` of `owner` (a mapped file): no copy, and the pages
    /// stay shared with the page cache.
    pub fn from_shared(
        ty: QType,
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
            packed: false,
            isa: Isa::detect(),
        }
        .repacked())
    }

    /// [`QMatrix::from_shared`] for an `owner` that is a read-only file mapping: when the blocks
    /// are repacked into memory of their own, the mapped source pages are released from this
    /// process's resident set (they stay in the page cache; a later read faults them back in
    /// from the file), so the weights are not resident twice.
    ///
    /// # Safety
    /// `owner` must be a mapping of a file (not anonymous or heap memory, whose released pages
    /// would read back as zeros) that nobody writes through.
    pub unsafe fn from_mapped(
        ty: QType,
        rows: usize,
        cols: usize,
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Result<Self, KernelError> {
        let source = Data::Shared(owner.clone(), range.clone());
        let m = Self::from_shared(ty, rows, cols, owner, range)?;
        if m.packed {
            // SAFETY: the caller guarantees a read-only file mapping.
            unsafe { source.release() };
        }
        Ok(m)
    }

    /// Packs or unpacks the blocks as the instruction set wants them.
    fn repacked(mut self) -> Self {
        let want = self.isa != Isa::Scalar && packed::packable(self.rows);
        if want == self.packed {
            return self;
        }
        let nb = self.cols / QK;
        let src = self.data.bytes();
        let group_bytes = nb * self.ty.block_bytes() * packed::GROUP;
        let (ty, rows) = (self.ty, self.rows);
        self.data = if want {
            let mut dst = packed::Buffer::zeroed(src.len());
            // Groups are independent: packed on the pool (load time).
            dst.as_mut_slice()
                .par_chunks_mut(group_bytes)
                .zip(src.par_chunks(group_bytes))
                .for_each(|(d, s)| packed::pack(ty, packed::GROUP, nb, s, d));
            Data::Packed(dst)
        } else {
            let mut dst = vec![0u8; src.len()];
            packed::unpack(ty, rows, nb, src, &mut dst);
            Data::Owned(dst)
        };
        self.packed = want;
        self
    }

    fn check(ty: QType, rows: usize, cols: usize, len: usize) -> Result<(), KernelError> {
        if !cols.is_multiple_of(QK) {
            return Err(KernelError(format!(
                "{} rows must be a multiple of {QK} values, got {cols}",
                ty.name()
            )));
        }
        let want = rows * cols / QK * ty.block_bytes();
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
        self.repacked()
    }

    /// Whether the blocks are held in the packed 8-row layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }

    /// `NT` tokens' dot products with the weight row `w` (one of this matrix's rows).
    fn dot_tile<const NT: usize>(&self, w: &[u8], a: [&[ActBlock]; NT]) -> [f32; NT] {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a set detected on this CPU (`detect`, `with_isa`), and
        // every activation row holds `cols / 32` blocks (checked by the callers).
        unsafe {
            match (self.isa, self.ty) {
                (Isa::Avx2, QType::Q4_0) => return simd::avx2::q4_0(w, a),
                (Isa::Avx2, QType::Q4_1) => return simd::avx2::q4_1(w, a),
                (Isa::Avx2, QType::Q8_0) => return simd::avx2::q8_0(w, a),
                (Isa::Avx512Vnni, QType::Q4_0) => return simd::vnni::q4_0(w, a),
                (Isa::Avx512Vnni, QType::Q4_1) => return simd::vnni::q4_1(w, a),
                (Isa::Avx512Vnni, QType::Q8_0) => return simd::vnni::q8_0(w, a),
                (Isa::Scalar, _) => {}
            }
        }
        a.map(|a| dot_scalar(self.ty, w, a))
    }

    /// `out[t][r] = Σ_c w[r][c] · x[t][c]` for `tokens` rows of `x` (`[tokens, cols]`),
    /// writing `[tokens, rows]`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) -> Result<(), KernelError> {
        matmul_group(&[self], x, tokens, &mut [out])
    }
}

thread_local! {
    /// The quantized input and its block sums, reused between calls (no allocation per token).
    static ACTS: RefCell<(Vec<ActBlock>, Vec<i32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Tokens per tile: each weight row is unpacked once per tile.
const TILE: usize = 4;

/// Tokens per tile of the packed kernels: one accumulator per token next to the 8 unpacked
/// weight vectors (AVX2 has 16 vector registers, AVX-512 32).
const PACKED_TILE_AVX2: usize = 4;
const PACKED_TILE_AVX512: usize = 8;

/// Bytes of quantized activations a packed prefill keeps hot in the L2 cache while the weight
/// groups pass over them (the weights are then read from memory once per this many tokens).
const ACT_BUDGET: usize = 192 * 1024;

/// The activations of one call, shared by its tasks.
struct Acts<'a> {
    blocks: &'a [ActBlock],
    sums: &'a [i32],
    per_row: usize,
}

impl<'a> Acts<'a> {
    fn row(&self, t: usize) -> &'a [ActBlock] {
        &self.blocks[t * self.per_row..(t + 1) * self.per_row]
    }

    #[cfg(target_arch = "x86_64")]
    fn packed(&self, t: usize) -> packed::x86::Act<'a> {
        packed::x86::Act {
            blocks: self.row(t),
            sums: &self.sums[t * self.per_row..(t + 1) * self.per_row],
        }
    }
}

impl QMatrix {
    /// Rows `rows` of this matrix for every token, the rows one at a time (unpacked layout).
    fn run_rows(&self, rows: std::ops::Range<usize>, acts: &Acts, tokens: usize, dst: SharedOut) {
        let (bytes, rb) = (self.data.bytes(), self.cols / QK * self.ty.block_bytes());
        let mut t = 0;
        while t < tokens {
            let nt = if tokens - t >= TILE { TILE } else { 1 };
            for r in rows.clone() {
                let w = &bytes[r * rb..(r + 1) * rb];
                let put = |k: usize, v: f32| {
                    // SAFETY: row `r` belongs to this task alone, and `(t + k) * rows + r` is in
                    // bounds (output lengths checked by `matmul_group`).
                    unsafe { dst.write((t + k) * self.rows + r, v) }
                };
                if nt == TILE {
                    let a = [
                        acts.row(t),
                        acts.row(t + 1),
                        acts.row(t + 2),
                        acts.row(t + 3),
                    ];
                    for (k, v) in self.dot_tile(w, a).into_iter().enumerate() {
                        put(k, v);
                    }
                } else {
                    put(0, self.dot_tile(w, [acts.row(t)])[0]);
                }
            }
            t += nt;
        }
    }

    /// Rows `rows` (whole groups of 8) of a packed matrix for every token. Prefill takes the
    /// tokens in chunks that stay in L2 while each chunk's groups stream past once.
    #[cfg(target_arch = "x86_64")]
    fn run_packed(&self, rows: std::ops::Range<usize>, acts: &Acts, tokens: usize, dst: SharedOut) {
        if self.isa == Isa::Avx512Vnni {
            self.run_packed_tiles::<PACKED_TILE_AVX512>(rows, acts, tokens, dst)
        } else {
            self.run_packed_tiles::<PACKED_TILE_AVX2>(rows, acts, tokens, dst)
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn run_packed_tiles<const PACKED_TILE: usize>(
        &self,
        rows: std::ops::Range<usize>,
        acts: &Acts,
        tokens: usize,
        dst: SharedOut,
    ) {
        let gb = self.cols / QK * self.ty.block_bytes() * packed::GROUP;
        let bytes = self.data.bytes();
        let chunk = (ACT_BUDGET / (acts.per_row * std::mem::size_of::<ActBlock>()))
            .max(PACKED_TILE)
            / PACKED_TILE
            * PACKED_TILE;
        // AVX-512 takes two adjacent groups at once (16 rows, 512-bit vectors) and the tokens
        // in tiles of 1 to 8, as even as they come (9 tokens are 5 + 4, not 8 + 1). A single
        // token (decode) keeps the one-group kernels, which measured faster there.
        let pairs = self.isa == Isa::Avx512Vnni && tokens > 1;
        let (first, end) = (rows.start / packed::GROUP, rows.end / packed::GROUP);
        // The pair tiles of a chunk (first token, tokens, their activations), built once per
        // chunk rather than once per pair of groups.
        let mut tiles: Vec<(usize, usize, [packed::x86::Act; PACKED_TILE_AVX512])> = Vec::new();
        let mut c = 0;
        while c < tokens {
            let c_end = (c + chunk).min(tokens);
            tiles.clear();
            if pairs {
                let mut t = c;
                while t < c_end {
                    let left = c_end - t;
                    let nt = left.div_ceil(left.div_ceil(PACKED_TILE_AVX512));
                    tiles.push((
                        t,
                        nt,
                        std::array::from_fn(|k| acts.packed((t + k).min(t + nt - 1))),
                    ));
                    t += nt;
                }
            }
            let mut g = first;
            while g < end {
                let n = if pairs && g + 1 < end { 2 } else { 1 };
                let w = &bytes[g * gb..(g + n) * gb];
                // SAFETY: rows `8g..8g + 8n` belong to this task alone; token `t < tokens`.
                let out = |t: usize| unsafe { dst.0.add(t * self.rows + g * packed::GROUP) };
                if n == 2 {
                    // The next pair's output lines, when this task writes them: the other core
                    // read these lines last (the previous product's or layer's input), and a
                    // store that waits for a line to come back stalls the stores behind it.
                    let ahead = g + 4 <= end;
                    for &(t, nt, ref a) in &tiles {
                        if ahead {
                            for k in t..t + nt {
                                let next = out(k).wrapping_add(2 * packed::GROUP);
                                quant::prefetch_write(next as *const i8);
                                quant::prefetch_write(next.wrapping_add(15) as *const i8);
                            }
                        }
                        self.packed_pair(w, nt, |k| a[k], |k| out(t + k));
                    }
                    g += n;
                    continue;
                }
                let mut t = c;
                while t < c_end {
                    if c_end - t >= PACKED_TILE {
                        let a = std::array::from_fn(|k| acts.packed(t + k));
                        self.packed_tile::<PACKED_TILE>(w, a, std::array::from_fn(|k| out(t + k)));
                        t += PACKED_TILE;
                    } else {
                        self.packed_tile::<1>(w, [acts.packed(t)], [out(t)]);
                        t += 1;
                    }
                }
                g += n;
            }
            c = c_end;
        }
    }

    /// Two adjacent packed groups (16 rows, `w`) against `nt` (1 to 8) tokens `act(0..nt)`,
    /// writing 16 values at each `out(k)`: the same values as [`Self::packed_tile`] on each
    /// group.
    #[cfg(target_arch = "x86_64")]
    fn packed_pair<'a>(
        &self,
        w: &[u8],
        nt: usize,
        act: impl Fn(usize) -> packed::x86::Act<'a>,
        out: impl Fn(usize) -> *mut f32,
    ) {
        use packed::x86::vnni_pairs;
        debug_assert_eq!(self.isa, Isa::Avx512Vnni);
        macro_rules! tiles {
            ($($n:literal)*) => {
                match nt {
                    $($n => {
                        let (a, o) = (std::array::from_fn(&act), std::array::from_fn(&out));
                        // SAFETY: the matrix is packed on AVX-512 VNNI, detected on this CPU;
                        // `w` is two whole groups of `a`'s block count, and each `out(k)` has
                        // 16 writable values of this task.
                        unsafe {
                            match self.ty {
                                QType::Q4_0 => vnni_pairs::q4_0::<$n>(w, a, o),
                                QType::Q4_1 => vnni_pairs::q4_1::<$n>(w, a, o),
                                QType::Q8_0 => vnni_pairs::q8_0::<$n>(w, a, o),
                            }
                        }
                    })*
                    _ => unreachable!("a pair tile holds 1 to 8 tokens"),
                }
            };
        }
        tiles!(1 2 3 4 5 6 7 8)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run_packed(&self, _: std::ops::Range<usize>, _: &Acts, _: usize, _: SharedOut) {
        unreachable!("matrices are packed on x86-64 only")
    }

    /// One packed group (8 rows, `w`) against `NT` tokens, writing 8 values at each `out[t]`.
    #[cfg(target_arch = "x86_64")]
    fn packed_tile<const NT: usize>(
        &self,
        w: &[u8],
        a: [packed::x86::Act; NT],
        out: [*mut f32; NT],
    ) {
        use packed::x86::{avx2, vnni, vnni_tiles};
        // SAFETY: the matrix is packed only on a SIMD set detected on this CPU, `w` is one whole
        // group of `a`'s block count, and each `out[t]` has 8 writable values of this task.
        unsafe {
            match (self.isa, self.ty) {
                // Tiles of tokens: the same results, the integer sums across the tokens.
                (Isa::Avx512Vnni, QType::Q4_1) if NT > 1 => vnni_tiles::q4_1(w, a, out),
                (Isa::Avx512Vnni, QType::Q8_0) if NT > 1 => vnni_tiles::q8_0(w, a, out),
                (Isa::Avx512Vnni, QType::Q4_0) => vnni::q4_0(w, a, out),
                (Isa::Avx512Vnni, QType::Q4_1) => vnni::q4_1(w, a, out),
                (Isa::Avx512Vnni, QType::Q8_0) => vnni::q8_0(w, a, out),
                (Isa::Avx2, QType::Q4_0) => avx2::q4_0(w, a, out),
                (Isa::Avx2, QType::Q4_1) => avx2::q4_1(w, a, out),
                (Isa::Avx2, QType::Q8_0) => avx2::q8_0(w, a, out),
                (Isa::Scalar, _) => unreachable!("only matrices on a SIMD set are packed"),
            }
        }
    }
}

/// The shared column count of `mats` (`None` when there are none), after checking that `x`
/// holds `tokens` rows of it and each `outs[i]` `tokens` rows of `mats[i]`.
pub(crate) fn check_shapes(
    mats: &[&QMatrix],
    x: &[f32],
    tokens: usize,
    outs: &[&mut [f32]],
) -> Result<Option<usize>, KernelError> {
    let Some(first) = mats.first() else {
        return Ok(None);
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
    Ok(Some(cols))
}

/// Several matrices with the same number of columns applied to the same input `x`
/// (`[tokens, cols]`): `outs[i]` gets `[tokens, mats[i].rows]`. The input is quantized once, and
/// all rows of all matrices are shared out in one parallel region.
pub fn matmul_group(
    mats: &[&QMatrix],
    x: &[f32],
    tokens: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let Some(cols) = check_shapes(mats, x, tokens, outs)? else {
        return Ok(());
    };
    if tokens == 0 {
        return Ok(());
    }
    let per_row = cols / QK;
    // The buffers are taken out of the thread-local for the call: while this thread waits in
    // the parallel region, the pool may run another forward pass's matmul on it (two requests
    // served at once), which then starts from empty buffers instead of a double borrow.
    let mut buffer = ACTS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    {
        let (blocks, sums) = &mut buffer;
        blocks.resize(tokens * per_row, ActBlock::default());
        if mats.iter().any(|m| m.packed) {
            sums.resize(tokens * per_row, 0);
            quantize_rows(x, tokens, blocks, Some(sums.as_mut_slice()));
        } else {
            quantize_rows(x, tokens, blocks, None);
        }
        let acts = Acts {
            blocks,
            sums,
            per_row,
        };
        let dsts: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
        // Work is shared out in units of 8 rows (a packed group).
        let spans = Spans::new(mats.iter().map(|m| m.rows.div_ceil(packed::GROUP)));
        // Tasks own disjoint rows and write `out[t][row]` in place.
        let work = |range: std::ops::Range<usize>| {
            spans.for_each(range, |mi, units| {
                let m = mats[mi];
                let rows = units.start * packed::GROUP..(units.end * packed::GROUP).min(m.rows);
                if m.packed {
                    m.run_packed(rows, &acts, tokens, dsts[mi]);
                } else {
                    m.run_rows(rows, &acts, tokens, dsts[mi]);
                }
            });
        };
        parallel_units(spans.total(), tokens, &work);
    }
    ACTS.with(|a| *a.borrow_mut() = buffer);
    Ok(())
}

/// Activation blocks from which the quantization is shared out over the pool (a 32-token
/// step's 576-wide input has 576): below, a hand-off costs about what it saves.
const QUANT_PAR_MIN: usize = 512;

/// Quantizes the `tokens` rows of `x` into `blocks`, and their block sums into `sums` when
/// given (as long as `blocks`); many rows are shared out over the pool by whole rows, each
/// block quantized by the same code either way.
pub(crate) fn quantize_rows(
    x: &[f32],
    tokens: usize,
    blocks: &mut [ActBlock],
    sums: Option<&mut [i32]>,
) {
    let threads = rayon::current_num_threads();
    if threads == 1 || tokens < 2 || blocks.len() < QUANT_PAR_MIN {
        match sums {
            Some(sums) => quantize_with_sums(x, blocks, sums),
            None => quantize_into(x, blocks),
        }
        return;
    }
    let (per_row, cols) = (blocks.len() / tokens, x.len() / tokens);
    let rows = tokens.div_ceil(threads);
    let (bc, xc) = (rows * per_row, rows * cols);
    match sums {
        Some(sums) => blocks
            .par_chunks_mut(bc)
            .zip(x.par_chunks(xc))
            .zip(sums.par_chunks_mut(bc))
            .for_each(|((b, x), s)| quantize_with_sums(x, b, s)),
        None => blocks
            .par_chunks_mut(bc)
            .zip(x.par_chunks(xc))
            .for_each(|(b, x)| quantize_into(x, b)),
    }
}

/// Runs `f` on a thread of the pool the kernels use, so that the calling thread sleeps for the
/// whole forward pass instead of competing for a core with the pool's workers between
/// products (on 2 cores: 2 busy threads, not 3).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // From outside the pool, `join` runs both closures on a worker and blocks until done.
    rayon::join(f, || ()).0
}

/// The matrices of a group laid end to end, measured in units (rows, or 8-row groups): a task's
/// global range of units becomes, for each matrix it crosses, that matrix's local range.
pub(crate) struct Spans {
    starts: Vec<usize>,
    total: usize,
}

impl Spans {
    pub(crate) fn new(units: impl Iterator<Item = usize>) -> Spans {
        let mut total = 0;
        let starts = units
            .map(|n| {
                let start = total;
                total += n;
                start
            })
            .collect();
        Spans { starts, total }
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Calls `f(matrix index, local range)` for each matrix `range` crosses, in order.
    pub(crate) fn for_each(
        &self,
        range: std::ops::Range<usize>,
        mut f: impl FnMut(usize, std::ops::Range<usize>),
    ) {
        let mut mi = self.starts.partition_point(|&s| s <= range.start) - 1;
        let mut g = range.start;
        while g < range.end {
            let next = self.starts.get(mi + 1).copied().unwrap_or(self.total);
            let end = next.min(range.end);
            f(mi, g - self.starts[mi]..end - self.starts[mi]);
            g = end;
            mi += 1;
        }
    }
}

/// Splits `0..n` units of 8 rows into a few tasks per thread (fewer hand-offs than
/// fine-grained tasks, enough for work stealing to even out a busy core). Tasks take an even
/// number of units, so that the AVX-512 kernels find their packed groups in pairs.
fn parallel_units(n: usize, tokens: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let threads = rayon::current_num_threads();
    // Below this much work a hand-off costs more than it saves.
    if threads == 1 || n * packed::GROUP * tokens < 256 {
        return f(0..n);
    }
    let tasks = threads * 4;
    let chunk = n.div_ceil(tasks).next_multiple_of(2);
    (0..n.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| f(c * chunk..((c + 1) * chunk).min(n)));
}

/// Deterministic test inputs in [-1, 1) (a linear congruential generator), shared by the
/// crate's tests.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: [QType; 3] = [QType::Q4_0, QType::Q4_1, QType::Q8_0];

    /// `out[t][r]` of the product of the dequantized weights with the unquantized input in
    /// f64, and `Σ|w·x|` for a relative bound.
    fn reference(ty: QType, bytes: &[u8], x: &[f32], rows: usize, cols: usize) -> Vec<(f64, f64)> {
        let bb = ty.block_bytes();
        let tokens = x.len() / cols;
        let mut out = Vec::with_capacity(tokens * rows);
        for t in 0..tokens {
            for r in 0..rows {
                let (mut want, mut mag) = (0f64, 0f64);
                for b in 0..cols / QK {
                    let off = (r * cols / QK + b) * bb;
                    let wv = dequantize_block(ty, &bytes[off..off + bb]);
                    for (j, w) in wv.iter().enumerate() {
                        let xv = x[t * cols + b * QK + j] as f64;
                        want += w * xv;
                        mag += (w * xv).abs();
                    }
                }
                out.push((want, mag));
            }
        }
        out
    }

    /// Every type on every path this CPU has (packed and row by row), against the exact
    /// product of the dequantized weights with the unquantized input in f64: the only error
    /// left is the activations' 8-bit rounding (≤ max|x|/254 per value), bounded relative to
    /// Σ|w·x|.
    #[test]
    fn every_type_and_path_matches_an_f64_reference() {
        // 37 rows: not a multiple of 8 (row by row), uneven task split; 40 rows: packed in 5
        // groups. 6 tokens: one tile of 4 and two single tokens. 4096 columns and 41 tokens:
        // a packed prefill in two token chunks.
        for (rows, cols, tokens) in [(37, 256, 6), (40, 256, 6), (24, 4096, 41)] {
            let x = pseudo_random(tokens * cols, 2);
            for ty in TYPES {
                let bytes = quantize_weights(ty, &pseudo_random(rows * cols, 1));
                let want = reference(ty, &bytes, &x, rows, cols);
                for isa in Isa::available() {
                    let m = QMatrix::from_bytes(ty, rows, cols, &bytes)
                        .unwrap()
                        .with_isa(isa);
                    assert_eq!(m.isa(), isa);
                    let packs = isa != Isa::Scalar && rows % 8 == 0;
                    assert_eq!(m.is_packed(), packs, "{ty:?} {isa:?} {rows}");
                    let mut out = vec![0f32; tokens * rows];
                    m.matmul(&x, tokens, &mut out).unwrap();
                    let worst = out
                        .iter()
                        .zip(&want)
                        .map(|(&o, &(w, mag))| (o as f64 - w).abs() / mag)
                        .fold(0f64, f64::max);
                    assert!(
                        worst <= 1e-2,
                        "{ty:?} {isa:?} {rows}x{cols}: relative error {worst}"
                    );
                }
            }
        }
    }

    /// A packed matrix switched to the scalar path is unpacked back to the file's bytes.
    #[test]
    fn repacking_round_trips_through_the_scalar_path() {
        let (rows, cols) = (16, 128);
        for ty in TYPES {
            let bytes = quantize_weights(ty, &pseudo_random(rows * cols, 11));
            let m = QMatrix::from_bytes(ty, rows, cols, &bytes).unwrap();
            assert_eq!(m.is_packed(), Isa::detect() != Isa::Scalar);
            let m = m.with_isa(Isa::Scalar);
            assert!(!m.is_packed());
            assert_eq!(m.data.bytes(), &bytes[..]);
        }
    }

    /// Forward passes of two requests share the pool: while one waits in its parallel region,
    /// its thread may run the other's matmul. Both must finish with their own results.
    #[test]
    fn concurrent_matmuls_on_the_pool_do_not_collide() {
        let (rows, cols, tokens) = (512, 1024, 5);
        let bytes = quantize_weights(QType::Q8_0, &pseudo_random(rows * cols, 5));
        let m = QMatrix::from_bytes(QType::Q8_0, rows, cols, &bytes).unwrap();
        let x = pseudo_random(tokens * cols, 6);
        let mut want = vec![0f32; tokens * rows];
        m.matmul(&x, tokens, &mut want).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..30 {
                        let mut out = vec![0f32; tokens * rows];
                        on_pool(|| m.matmul(&x, tokens, &mut out)).unwrap();
                        assert_eq!(out, want);
                    }
                });
            }
        });
    }

    /// The SIMD paths compute the same integer sums as the scalar one; only the f32
    /// summation order differs.
    #[test]
    fn simd_paths_agree_with_scalar_closely() {
        let (rows, cols, tokens) = (16, 4096, 5);
        let x = pseudo_random(tokens * cols, 4);
        for ty in TYPES {
            let bytes = quantize_weights(ty, &pseudo_random(rows * cols, 3));
            let run = |isa| {
                let m = QMatrix::from_bytes(ty, rows, cols, &bytes)
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

    /// A packed matrix (40 rows) against the same weights' first 39 rows, which stay in the
    /// file's layout and go through the row-by-row SIMD kernels: the same integer sums, so
    /// only the f32 summation order differs. Decode (1 token), a tile and a remainder.
    #[test]
    fn packed_agrees_with_row_by_row() {
        let (rows, cols, tokens) = (40, 1024, 11);
        let x = pseudo_random(tokens * cols, 21);
        for ty in TYPES {
            let bytes = quantize_weights(ty, &pseudo_random(rows * cols, 22));
            let part = bytes.len() / rows * (rows - 1);
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
                let packed = QMatrix::from_bytes(ty, rows, cols, &bytes)
                    .unwrap()
                    .with_isa(isa);
                let plain = QMatrix::from_bytes(ty, rows - 1, cols, &bytes[..part])
                    .unwrap()
                    .with_isa(isa);
                assert!(packed.is_packed() && !plain.is_packed());
                for n in [1, tokens] {
                    let mut a = vec![0f32; n * rows];
                    let mut b = vec![0f32; n * (rows - 1)];
                    packed.matmul(&x[..n * cols], n, &mut a).unwrap();
                    plain.matmul(&x[..n * cols], n, &mut b).unwrap();
                    for t in 0..n {
                        for r in 0..rows - 1 {
                            let (p, q) = (a[t * rows + r], b[t * (rows - 1) + r]);
                            assert!(
                                (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                                "{ty:?} {isa:?} token {t} row {r}: {p} vs {q}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A token's values do not depend on the other tokens of the call: batches of several
    /// sizes (tiles of two groups at once, uneven tiles, a last unpaired group) give each
    /// token's values bit for bit as the token alone (decode kernels) does.
    #[test]
    fn batched_tokens_equal_each_token_alone() {
        let (rows, cols) = (40, 320);
        let x = pseudo_random(17 * cols, 51);
        for ty in TYPES {
            let bytes = quantize_weights(ty, &pseudo_random(rows * cols, 52));
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
                let m = QMatrix::from_bytes(ty, rows, cols, &bytes)
                    .unwrap()
                    .with_isa(isa);
                assert!(m.is_packed());
                let alone: Vec<u32> = (0..17)
                    .flat_map(|t| {
                        let mut o = vec![0f32; rows];
                        m.matmul(&x[t * cols..(t + 1) * cols], 1, &mut o).unwrap();
                        o.into_iter().map(f32::to_bits)
                    })
                    .collect();
                for n in [2, 3, 8, 9, 13, 17] {
                    let mut o = vec![0f32; n * rows];
                    m.matmul(&x[..n * cols], n, &mut o).unwrap();
                    let got: Vec<u32> = o.into_iter().map(f32::to_bits).collect();
                    assert_eq!(got, alone[..n * rows], "{ty:?} {isa:?} {n} tokens");
                }
            }
        }
    }

    #[test]
    fn group_equals_separate_products() {
        let cols = 128;
        let x = pseudo_random(5 * cols, 9);
        let a = QMatrix::from_bytes(
            QType::Q4_1,
            21,
            cols,
            &quantize_weights(QType::Q4_1, &pseudo_random(21 * cols, 7)),
        )
        .unwrap();
        let b = QMatrix::from_bytes(
            QType::Q8_0,
            40,
            cols,
            &quantize_weights(QType::Q8_0, &pseudo_random(40 * cols, 8)),
        )
        .unwrap();
        let (mut ga, mut gb) = (vec![0f32; 5 * 21], vec![0f32; 5 * 40]);
        matmul_group(&[&a, &b], &x, 5, &mut [&mut ga, &mut gb]).unwrap();
        let (mut sa, mut sb) = (vec![0f32; 5 * 21], vec![0f32; 5 * 40]);
        a.matmul(&x, 5, &mut sa).unwrap();
        b.matmul(&x, 5, &mut sb).unwrap();
        assert_eq!(ga, sa);
        assert_eq!(gb, sb);
    }

    #[test]
    fn activations_round_half_to_even_and_keep_the_sum() {
        // max 127 → id 1: 0.5 → 0, 1.5 → 2, -2.5 → -2.
        let mut x = vec![0f32; QK];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = -2.5;
        let mut b = [ActBlock::default()];
        quantize_into(&x, &mut b);
        assert_eq!(&b[0].qs[..4], &[127, 0, 2, -2]);
        assert_eq!(b[0].s, 127.0);
        assert_eq!(b[0].d, 1.0);
    }

    #[test]
    fn shared_bytes_read_in_place_equal_owned() {
        let cols = 64;
        let bytes = quantize_weights(QType::Q4_0, &pseudo_random(3 * cols, 5));
        let mut file = vec![0xAAu8; 7];
        file.extend_from_slice(&bytes);
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(file);
        let shared =
            QMatrix::from_shared(QType::Q4_0, 3, cols, owner.clone(), 7..7 + bytes.len()).unwrap();
        let owned = QMatrix::from_bytes(QType::Q4_0, 3, cols, &bytes).unwrap();
        let x = pseudo_random(cols, 6);
        let (mut a, mut b) = (vec![0f32; 3], vec![0f32; 3]);
        shared.matmul(&x, 1, &mut a).unwrap();
        owned.matmul(&x, 1, &mut b).unwrap();
        assert_eq!(a, b);
        assert!(QMatrix::from_shared(QType::Q4_0, 3, cols, owner, 8..8 + bytes.len()).is_err());
    }

    /// Repacking a file mapping releases the source pages; the mapping still reads the file's
    /// bytes (faulted in again), and the product equals that of a copied matrix.
    #[test]
    fn mapped_blocks_are_released_and_read_back_from_the_file() {
        let (rows, cols) = (64, 512);
        let bytes = quantize_weights(QType::Q8_0, &pseudo_random(rows * cols, 12));
        let mut file = vec![0x55u8; 4096];
        file.extend_from_slice(&bytes);
        file.extend_from_slice(&[0x66; 4096]);
        let path = std::env::temp_dir().join(format!("camelid-kernels-{}", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        let map = unsafe { memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()) }.unwrap();
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(map);
        let range = 4096..4096 + bytes.len();
        // SAFETY: `owner` is a read-only file mapping.
        let m =
            unsafe { QMatrix::from_mapped(QType::Q8_0, rows, cols, owner.clone(), range) }.unwrap();
        assert_eq!(m.is_packed(), Isa::detect() != Isa::Scalar);
        assert!((*owner).as_ref() == &file[..]);
        let copied = QMatrix::from_bytes(QType::Q8_0, rows, cols, &bytes).unwrap();
        let x = pseudo_random(3 * cols, 13);
        let (mut a, mut b) = (vec![0f32; 3 * rows], vec![0f32; 3 * rows]);
        m.matmul(&x, 3, &mut a).unwrap();
        copied.matmul(&x, 3, &mut b).unwrap();
        assert_eq!(a, b);
        std::fs::remove_file(&path).unwrap();
    }

    /// The input quantized by rows shared out over the pool equals it quantized in one pass,
    /// with and without block sums, at token counts that split evenly and unevenly.
    #[test]
    fn quantized_rows_in_parallel_equal_one_pass() {
        let cols = 288;
        for tokens in [1, 7, 64, 65] {
            let x = pseudo_random(tokens * cols, tokens as u32);
            let n = tokens * cols / QK;
            let (mut one, mut one_sums) = (vec![ActBlock::default(); n], vec![0; n]);
            quantize_with_sums(&x, &mut one, &mut one_sums);
            let (mut par, mut par_sums, mut bare) = (
                vec![ActBlock::default(); n],
                vec![0; n],
                vec![ActBlock::default(); n],
            );
            on_pool(|| {
                quantize_rows(&x, tokens, &mut par, Some(&mut par_sums));
                quantize_rows(&x, tokens, &mut bare, None);
            });
            assert_eq!(one_sums, par_sums, "{tokens}");
            for (b, o) in one.iter().enumerate() {
                for p in [&par[b], &bare[b]] {
                    assert_eq!(
                        (o.qs, o.d.to_bits(), o.s.to_bits()),
                        (p.qs, p.d.to_bits(), p.s.to_bits()),
                        "{tokens} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::from_bytes(QType::Q4_1, 2, 30, &[0; 40]).is_err());
        assert!(QMatrix::from_bytes(QType::Q4_1, 2, 32, &[0; 39]).is_err());
        assert!(QMatrix::from_bytes(QType::Q8_0, 2, 32, &[0; 40]).is_err());
        let m = QMatrix::from_bytes(QType::Q4_1, 2, 32, &[0; 40]).unwrap();
        assert!(m.matmul(&[0.0; 31], 1, &mut [0.0; 2]).is_err());
    }
}
