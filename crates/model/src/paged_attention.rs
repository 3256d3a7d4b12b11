//! Attention of a batched pass ([`crate::transformer::Transformer::forward_batch`]) read
//! straight from a paged KV pool: each member's new keys and values are written into its
//! blocks, and its queries attend over the blocks in place, with no copy of the cache and no
//! per-member tensor operations. A task is a member's rows for a run of heads; within it each
//! query row sums in a fixed order, so a row's result does not depend on the other members, on
//! how the heads were grouped or on how its sequence was cut into pieces. The same functions
//! serve one sequence alone ([`attend_contiguous`]), so a sequence gets the same numbers
//! served among others.

use rayon::prelude::*;

/// One layer of the pool, as the store lends it for a pass.
pub struct KvPages<'a> {
    /// Keys and values, `[block][kv_head][slot][head_dim]`.
    pub keys: &'a mut [f32],
    pub values: &'a mut [f32],
    /// Each batch member's blocks in position order (long enough for this pass).
    pub tables: &'a [&'a [u32]],
    /// Positions per block.
    pub block_size: usize,
}

/// The attention shape of a layer.
pub struct Geometry<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// A query sees keys less than this many positions back.
    pub window: Option<usize>,
    /// ALiBi slope per head (added as `slope · key position`).
    pub alibi: Option<&'a [f32]>,
}

/// A member's rows in the pass: positions `start..start + len`, rows `offset..offset + len`.
#[derive(Clone, Copy)]
pub struct Member {
    pub start: usize,
    pub offset: usize,
    pub len: usize,
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` must be in bounds and written by one task only.
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// Causal attention of every member. `q`: `[heads, total, head_dim]` (after rotary), `k`:
/// `[kv_heads, total, head_dim]` (after rotary), `v`: `[total, kv_heads, head_dim]`; `out`
/// gets `[total, heads · head_dim]`. Members' keys are stored first, then all attend, so a
/// member sees what earlier pieces of its sequence in the same pass stored.
pub fn attend(
    g: &Geometry,
    members: &[Member],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pages: KvPages,
    out: &mut [f32],
) -> Result<(), String> {
    let (nh, nkv, hd, bs) = (g.heads, g.kv_heads, g.head_dim, pages.block_size);
    let total: usize = members.iter().map(|m| m.len).sum();
    if nkv == 0 || nh % nkv != 0 || members.len() != pages.tables.len() {
        return Err("paged attention: inconsistent heads or members".into());
    }
    if q.len() != nh * total * hd
        || k.len() != nkv * total * hd
        || v.len() != nkv * total * hd
        || out.len() != nh * total * hd
    {
        return Err("paged attention: buffer sizes do not match the rows".into());
    }
    let (hs, bst) = (bs * hd, nkv * bs * hd);
    let pool_blocks = pages.keys.len().min(pages.values.len()) / bst.max(1);
    for (m, table) in members.iter().zip(pages.tables) {
        let need = (m.start + m.len).div_ceil(bs);
        if table.len() < need {
            return Err(format!("position {} has no KV block", m.start + m.len - 1));
        }
        if let Some(b) = table[..need].iter().find(|&&b| b as usize >= pool_blocks) {
            return Err(format!("KV block {b} is outside the pool of {pool_blocks}"));
        }
    }
    let slot = |table: &[u32], pos: usize| table[pos / bs] as usize * bst + (pos % bs) * hd;
    for (m, table) in members.iter().zip(pages.tables) {
        for i in 0..m.len {
            let at = slot(table, m.start + i);
            let row = m.offset + i;
            for h in 0..nkv {
                let dst = at + h * hs;
                let ks = (h * total + row) * hd;
                let vs = (row * nkv + h) * hd;
                pages.keys[dst..dst + hd].copy_from_slice(&k[ks..ks + hd]);
                pages.values[dst..dst + hd].copy_from_slice(&v[vs..vs + hd]);
            }
        }
    }
    attend_stored(
        g,
        members,
        q,
        pages.keys,
        pages.values,
        pages.tables,
        bs,
        out,
    );
    Ok(())
}

/// Causal attention of one sequence over its keys and values laid out contiguously
/// (`[kv_heads, start + len, head_dim]`, the new positions included): the same arithmetic as
/// [`attend`] over pages, so the plain forward pass and a batched one agree bit for bit.
/// `q`: `[heads, len, head_dim]`; `out` gets `[len, heads · head_dim]`.
pub fn attend_contiguous(
    g: &Geometry,
    start: usize,
    len: usize,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
) -> Result<(), String> {
    let (nh, nkv, hd) = (g.heads, g.kv_heads, g.head_dim);
    let total = start + len;
    if nkv == 0
        || nh % nkv != 0
        || q.len() != nh * len * hd
        || keys.len() != nkv * total * hd
        || values.len() != keys.len()
        || out.len() != nh * len * hd
    {
        return Err("attention: buffer sizes do not match the rows".into());
    }
    let member = Member {
        start,
        offset: 0,
        len,
    };
    // One block as long as the sequence.
    attend_stored(g, &[member], q, keys, values, &[&[0]], total, out);
    Ok(())
}

/// The attention proper, over keys and values already stored (sizes checked by the callers).
#[allow(clippy::too_many_arguments)]
fn attend_stored(
    g: &Geometry,
    members: &[Member],
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    tables: &[&[u32]],
    bs: usize,
    out: &mut [f32],
) {
    let (nh, hd) = (g.heads, g.head_dim);
    let total: usize = members.iter().map(|m| m.len).sum();
    let rows = Rows {
        g,
        members,
        q,
        keys,
        values,
        tables,
        bs,
        total,
        dst: OutPtr(out.as_mut_ptr()),
    };
    // A task is a member's rows for a run of heads: a decode row's heads that share keys and
    // values go together (those are read from memory once, then from cache), a longer
    // member's heads one by one (more tasks to share out). How the work is cut does not
    // change any row's result.
    let rep = nh / g.kv_heads;
    let work: usize = members
        .iter()
        .map(|m| m.len * (m.start + m.len))
        .sum::<usize>()
        * nh
        * hd;
    // One decode row alone keeps a task per head (3 tasks for 2 threads would idle one).
    let group = members.len() >= 4;
    let pairs = members.iter().enumerate().flat_map(move |(mi, m)| {
        let n = if group && m.len == 1 { rep } else { 1 };
        (0..nh).step_by(n).map(move |h| (mi, h, n))
    });
    // While a task computes it asks, a few lines at a time, for the values it will weigh and
    // the next task's keys (see `Ahead`). Tasks of one member's KV head in a row (a longer
    // member's heads one by one) read the same keys and values, in cache after the first: only
    // the first asks for its values, only the last for the next task's keys.
    let kv = |&(mi, h0, _): &(usize, usize, usize)| (mi, h0 / rep);
    let run = |tasks: &[(usize, usize, usize)]| {
        let mut ahead = Ahead::default();
        for (i, t) in tasks.iter().enumerate() {
            let (mi, h0, n) = *t;
            ahead.clear();
            if i == 0 || kv(&tasks[i - 1]) != kv(t) {
                ahead.plan(&rows, rows.values, mi, h0);
            }
            if let Some(next) = tasks.get(i + 1).filter(|next| kv(next) != kv(t)) {
                ahead.plan(&rows, rows.keys, next.0, next.1);
            }
            head_group_ahead(&rows, mi, h0, n, &mut ahead);
        }
    };
    let tasks: Vec<_> = pairs.collect();
    if work < 1 << 16 || rayon::current_num_threads() == 1 {
        run(&tasks);
    } else {
        let chunk = tasks
            .len()
            .div_ceil(4 * rayon::current_num_threads())
            .max(1);
        tasks.par_chunks(chunk).for_each(run);
    }
}

/// The cache lines a task asks for while it computes: its own values (while it scores the
/// keys), then the next task's keys (while it weighs the values), the first row's in both
/// cases. A block's run of positions is a few KiB, contiguous, the blocks anywhere in the
/// pool, which the hardware prefetcher would only pick up after a few misses each. The lines
/// go out a few per group of keys and per value row, at about the rate the task consumes its
/// own, rather than all at once before a task starts: a burst of hundreds of prefetches fills
/// the core's miss buffers and stalls it until they return, so memory and arithmetic took
/// turns. Changes no number.
#[derive(Default)]
struct Ahead {
    /// Addresses of the lines still to ask for, the next first.
    lines: Vec<usize>,
    at: usize,
}

/// Lines a task asks for per group of 16 keys and head, and per value row weighed. A decode
/// row at position ~100 with 3 heads per KV head and head size 64 scores ~7 groups for each
/// of its 3 heads, asking for ~670 lines: its ~400 lines of values and the first two thirds
/// of the next task's keys; then 4 lines per value row (one row's worth) ask for the rest.
/// (24 or 48 per group, 3 or 6 per row measured within a few percent; 16 and 64 slower.)
const AHEAD_PER_GROUP: usize = 32;
const AHEAD_PER_ROW: usize = 4;

impl Ahead {
    fn clear(&mut self) {
        self.lines.clear();
        self.at = 0;
    }

    /// Plans the lines of `data` (keys or values) that task `(mi, h0, ·)`'s first row reads.
    fn plan(&mut self, r: &Rows, data: &[f32], mi: usize, h0: usize) {
        let (g, bs, hd) = (r.g, r.bs, r.g.head_dim);
        let (m, table) = (r.members[mi], r.tables[mi]);
        if m.len == 0 {
            return;
        }
        let (hs, bst) = (bs * hd, g.kv_heads * bs * hd);
        let kvh = h0 / (g.heads / g.kv_heads);
        let pos = m.start;
        let lo = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for (b, &block) in table.iter().enumerate().take(pos / bs + 1).skip(lo / bs) {
            let (from, to) = ((b * bs).max(lo), ((b + 1) * bs).min(pos + 1));
            let at = block as usize * bst + kvh * hs + (from - b * bs) * hd;
            // In bounds: the table's blocks up to `start + len` (≥ `pos + 1`) were checked.
            let span = data[at..at + (to - from) * hd].as_ptr_range();
            let first = span.start as usize & !63;
            self.lines.extend((first..span.end as usize).step_by(64));
        }
    }

    /// The lines left, for a task's loops to ask for (a copy kept in registers there).
    fn cursor(&self) -> Cursor<'_> {
        Cursor {
            lines: &self.lines,
            at: self.at,
        }
    }

    /// Asks for every line left.
    fn finish(&mut self) {
        self.cursor().rest();
        self.clear();
    }
}

/// [`Ahead`]'s lines as a task's loops walk them.
#[derive(Clone, Copy)]
struct Cursor<'a> {
    lines: &'a [usize],
    at: usize,
}

impl Cursor<'_> {
    /// Asks for the next `N` lines (unrolled: no loop for the task's loops to keep their
    /// registers across).
    #[inline(always)]
    fn issue<const N: usize>(&mut self) {
        for _ in 0..N {
            if let Some(&line) = self.lines.get(self.at) {
                prefetch(line);
                self.at += 1;
            }
        }
    }

    /// Asks for every line left.
    fn rest(&mut self) {
        for &line in &self.lines[self.at..] {
            prefetch(line);
        }
        self.at = self.lines.len();
    }
}

/// Asks for the cache line at `line`, into the core's second-level cache.
#[inline(always)]
fn prefetch(line: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and faults on no address; these lie inside the pool.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = line;
}

/// What every (member, head) task of a pass reads.
struct Rows<'a> {
    g: &'a Geometry<'a>,
    members: &'a [Member],
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    tables: &'a [&'a [u32]],
    bs: usize,
    total: usize,
    dst: OutPtr,
}

/// [`head_group_ahead`] asking for no lines.
#[cfg(test)]
fn head_group(r: &Rows, mi: usize, h0: usize, n: usize) {
    head_group_ahead(r, mi, h0, n, &mut Ahead::default())
}

/// A task's heads `h0 .. h0 + n` (sharing one KV head) for one member's rows. Head sizes that
/// are a multiple of 16 take [`group_rows_ahead`] (AVX-512 where the CPU has it, else the same
/// arithmetic in plain Rust, tested bit for bit), others [`head_rows_sequential`] one head at a
/// time. Which one runs depends only on the head size, so every path that must agree (a
/// sequence alone, served among others) takes the same one. It asks for `ahead`'s lines as
/// it goes.
fn head_group_ahead(r: &Rows, mi: usize, h0: usize, n: usize, ahead: &mut Ahead) {
    if r.g.head_dim.is_multiple_of(LANES) {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512() {
                // SAFETY: AVX-512F and FMA were detected on this CPU.
                return unsafe { group_rows_avx512_ahead(r, mi, h0, n, ahead) };
            }
            if std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: FMA was detected on this CPU.
                return unsafe { group_rows_fma_ahead(r, mi, h0, n, ahead) };
            }
        }
        return group_rows_ahead(r, mi, h0, n, Plain, ahead);
    }
    ahead.finish();
    for h in h0..h0 + n {
        head_rows_sequential(r, mi, h);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
use avx512::reduce16x16 as avx512_reduce16x16;

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// Lanes of the attention's vectors (one AVX-512 register of f32).
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// The sum of 16 lanes as a halving tree: the upper half added onto the lower, four times
/// (`a[m] + a[m + 8]`, then `+ [m + 4]`, `+ [m + 2]`, `+ [m + 1]`). Every sum of 16 partial sums
/// in [`group_rows_ahead`] is this one.
#[inline(always)]
fn reduce16(a: &Lanes) -> f32 {
    let mut s = *a;
    let mut half = LANES / 2;
    while half > 0 {
        for m in 0..half {
            s[m] += s[m + half];
        }
        half /= 2;
    }
    s[0]
}

/// `e^x` for `x ≤ 0` (the softmax's `s − max`), the same bits in every implementation: in
/// f64, `x` clamped to −120 (`e^x` then rounds to 0 in f32 anyway), `n = round(x·log₂e)`,
/// `r = x − n·ln 2` (one fused multiply-add), `e^r` by its Taylor series to degree 10 (relative
/// error under 3e-13 for `|r| ≤ ln 2 / 2`), times `2^n`, rounded once to f32. So the result is
/// `e^x` correctly rounded except where `e^x` lies within ~1e-12 (relative) of a halfway point
/// between two floats (tested against f64 `exp`).
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = (x as f64).max(EXP_MIN);
    let n = (x * std::f64::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-std::f64::consts::LN_2, x);
    let mut p = EXP_TAYLOR[0];
    for &c in &EXP_TAYLOR[1..] {
        p = p.mul_add(r, c);
    }
    (p * f64::from_bits(((n as i64 + 1023) << 52) as u64)) as f32
}

const EXP_MIN: f64 = -120.0;
/// `1/k!` for `k = 10, 9, …, 0`.
const EXP_TAYLOR: [f64; 11] = [
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// The three inner kernels of [`group_rows_ahead`]: one implementation in plain Rust
/// ([`Plain`], the definition) and one in AVX-512 intrinsics with the same operations in the
/// same order.
trait Kernel: Copy {
    /// `out[j] = q · k_j` for 16 keys: per lane `l`, `q[l]·k[l]` then `fma(q[16c + l],
    /// k[16c + l], ·)` over the column blocks `c` in order; then [`reduce16`].
    ///
    /// # Safety
    /// Every key row holds `q.len()` values, a multiple of 16; the CPU has what the
    /// implementation needs.
    unsafe fn dots(self, q: &[f32], keys: &[&[f32]; LANES]) -> Lanes;

    /// `s = e^(s − max)` over `s` ([`exp_neg`]); returns `Σ s` summed in 16 lanes (element
    /// `j` into lane `j mod 16`, in order) then [`reduce16`].
    ///
    /// # Safety
    /// The CPU has what the implementation needs.
    unsafe fn exp_sum(self, s: &mut [f32]) -> f32;

    /// For `H` heads: `out[h][d] = (Σ_k fma(e_h[k], v_k[d], ·)) · inv[h]` over the spans'
    /// keys in order, columns `c .. c + 16·C`; returns `16·C`. Asks for [`AHEAD_PER_ROW`] of
    /// `ahead`'s lines per value row.
    ///
    /// # Safety
    /// As [`Kernel::dots`]; `c + 16·C ≤ hd`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn weigh<const H: usize, const C: usize>(
        self,
        e: [&[f32]; H],
        inv: [f32; H],
        values: &[f32],
        spans: &[(usize, usize, usize)],
        c: usize,
        hd: usize,
        out: [&mut [f32]; H],
        ahead: &mut Cursor,
    ) -> usize;
}

/// [`Kernel`] in plain Rust: the definition of the arithmetic.
#[derive(Clone, Copy)]
struct Plain;

impl Kernel for Plain {
    #[inline(always)]
    unsafe fn dots(self, q: &[f32], keys: &[&[f32]; LANES]) -> Lanes {
        // Loops, not closures: inlined into a caller compiled for FMA, `mul_add` is one
        // instruction.
        let (q0, q) = q.split_at(LANES);
        let mut out = [0f32; LANES];
        for (o, k) in out.iter_mut().zip(keys) {
            let (k0, k) = k.split_at(LANES);
            let mut a = [0f32; LANES];
            for l in 0..LANES {
                a[l] = q0[l] * k0[l];
            }
            for (qc, kc) in q.chunks_exact(LANES).zip(k.chunks_exact(LANES)) {
                for l in 0..LANES {
                    a[l] = qc[l].mul_add(kc[l], a[l]);
                }
            }
            *o = reduce16(&a);
        }
        out
    }

    #[inline(always)]
    unsafe fn exp_sum(self, s: &mut [f32]) -> f32 {
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for x in s.iter_mut() {
            *x = exp_neg(*x - max);
        }
        let mut lanes = [0f32; LANES];
        let mut chunks = s.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                lanes[l] += c[l];
            }
        }
        for (a, &x) in lanes.iter_mut().zip(chunks.remainder()) {
            *a += x;
        }
        reduce16(&lanes)
    }

    #[inline(always)]
    unsafe fn weigh<const H: usize, const C: usize>(
        self,
        e: [&[f32]; H],
        inv: [f32; H],
        values: &[f32],
        spans: &[(usize, usize, usize)],
        c: usize,
        hd: usize,
        out: [&mut [f32]; H],
        ahead: &mut Cursor,
    ) -> usize {
        let w = LANES * C;
        for (h, out) in out.into_iter().enumerate() {
            // The sums in a local array (registers where the CPU has them), not in `out`.
            let mut acc = [[0f32; LANES]; C];
            for &(at, from, to) in spans {
                let span = &values[at..at + (to - from) * hd];
                for (&e, value) in e[h][from..to].iter().zip(span.chunks_exact(hd)) {
                    if h == 0 {
                        ahead.issue::<AHEAD_PER_ROW>();
                    }
                    for (a, v) in acc.iter_mut().zip(value[c..c + w].chunks_exact(LANES)) {
                        for l in 0..LANES {
                            a[l] = e.mul_add(v[l], a[l]);
                        }
                    }
                }
            }
            for (o, a) in out[c..c + w].chunks_exact_mut(LANES).zip(&acc) {
                for l in 0..LANES {
                    o[l] = a[l] * inv[h];
                }
            }
        }
        w
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_rows_fma_ahead(r: &Rows, mi: usize, h0: usize, n: usize, ahead: &mut Ahead) {
    group_rows_ahead(r, mi, h0, n, Plain, ahead)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn group_rows_avx512_ahead(r: &Rows, mi: usize, h0: usize, n: usize, ahead: &mut Ahead) {
    group_rows_ahead(r, mi, h0, n, avx512::Avx512, ahead)
}

/// The kernels as the tests call them: asking for no lines.
#[cfg(all(test, target_arch = "x86_64"))]
unsafe fn group_rows_fma(r: &Rows, mi: usize, h0: usize, n: usize) {
    group_rows_fma_ahead(r, mi, h0, n, &mut Ahead::default())
}

#[cfg(all(test, target_arch = "x86_64"))]
unsafe fn group_rows_avx512(r: &Rows, mi: usize, h0: usize, n: usize) {
    group_rows_avx512_ahead(r, mi, h0, n, &mut Ahead::default())
}

#[cfg(test)]
fn group_rows<K: Kernel>(r: &Rows, mi: usize, h0: usize, n: usize, kernel: K) {
    group_rows_ahead(r, mi, h0, n, kernel, &mut Ahead::default())
}

/// Attention of one member's rows for heads `h0 .. h0 + n` (one KV head's), the head size a
/// multiple of 16:
/// - the scores 16 keys at a time ([`Kernel::dots`]), `dot · scale + slope · position`; the
///   heads take turns on each group of keys while it is in cache;
/// - `e^(s − max)` and its sum ([`Kernel::exp_sum`]);
/// - each output column `(Σ_k e_k · v_k) / Σ e` in key order ([`Kernel::weigh`]), up to 4
///   heads at once on each value row.
///
/// The order of every sum is fixed by the row alone, so neither the other members, nor how the
/// heads are grouped, nor where the blocks are changes a number.
#[inline(always)]
fn group_rows_ahead<K: Kernel>(
    r: &Rows,
    mi: usize,
    h0: usize,
    n: usize,
    kernel: K,
    ahead: &mut Ahead,
) {
    let Rows {
        g,
        members,
        q,
        keys,
        values,
        tables,
        bs,
        total,
        dst,
    } = *r;
    let (nh, nkv, hd) = (g.heads, g.kv_heads, g.head_dim);
    let (hs, bst) = (bs * hd, nkv * bs * hd);
    let m = members[mi];
    let table = tables[mi];
    let kvh = h0 / (nh / nkv);
    // Per head: scores (room for a whole group of 16 past the last key), output row.
    let stride = m.start + m.len + LANES;
    // The thread's buffers from its previous task, zeroed to the sizes this one needs.
    let mut scratch = SCRATCH.with(|s| s.take());
    let Scratch {
        scores,
        out,
        inv,
        list,
    } = &mut scratch;
    let mut ahead_at = ahead.cursor();
    let ahead = &mut ahead_at;
    for (v, len) in [
        (&mut *scores, n * stride),
        (&mut *out, n * hd),
        (&mut *inv, n),
    ] {
        v.clear();
        v.resize(len, 0.0);
    }
    for i in 0..m.len {
        let pos = m.start + i;
        let lo = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        // Keys `lo..=pos` block by block: (where the span's first key is stored, its
        // position, the position after its last).
        let spans = (lo / bs..=pos / bs).map(|b| {
            let (from, to) = ((b * bs).max(lo), ((b + 1) * bs).min(pos + 1));
            let at = table[b] as usize * bst + kvh * hs + (from - b * bs) * hd;
            (at, from, to)
        });
        list.clear();
        list.extend(spans);
        for &(at, from, to) in list.iter() {
            // In bounds: the table's blocks up to `start + len` were checked above.
            let span = &keys[at..at + (to - from) * hd];
            let mut j = from;
            while j < to {
                // A group running past the span repeats its last key (computed, not kept).
                let key: [&[f32]; LANES] = std::array::from_fn(|k| {
                    let p = (j + k).min(to - 1) - from;
                    &span[p * hd..(p + 1) * hd]
                });
                let cnt = (to - j).min(LANES);
                for (hh, scores) in scores.chunks_exact_mut(stride).enumerate() {
                    let h = h0 + hh;
                    let qrow = &q[(h * total + m.offset + i) * hd..][..hd];
                    let slope = g.alibi.map_or(0.0, |a| a[h]);
                    // SAFETY: every key row holds `hd` values, a multiple of 16; the caller
                    // checked the CPU.
                    let d = unsafe { kernel.dots(qrow, &key) };
                    ahead.issue::<AHEAD_PER_GROUP>();
                    for (k, (&d, s)) in d.iter().zip(&mut scores[j..j + cnt]).enumerate() {
                        *s = d * g.scale + slope * (j + k) as f32;
                    }
                }
                j += cnt;
            }
        }
        for (scores, inv) in scores.chunks_exact_mut(stride).zip(inv.iter_mut()) {
            // SAFETY: the caller checked the CPU.
            *inv = 1.0 / unsafe { kernel.exp_sum(&mut scores[lo..=pos]) };
        }
        let mut h = 0;
        while h < n {
            let e = &scores[h * stride..];
            let o = &mut out[h * hd..];
            h += match n - h {
                4.. => {
                    weigh_heads::<4, K>(kernel, e, stride, &inv[h..], values, list, hd, o, ahead)
                }
                3 => weigh_heads::<3, K>(kernel, e, stride, &inv[h..], values, list, hd, o, ahead),
                2 => weigh_heads::<2, K>(kernel, e, stride, &inv[h..], values, list, hd, o, ahead),
                _ => weigh_heads::<1, K>(kernel, e, stride, &inv[h..], values, list, hd, o, ahead),
            };
        }
        for (hh, out) in out.chunks_exact(hd).enumerate() {
            let o = ((m.offset + i) * nh + h0 + hh) * hd;
            for (d, &a) in out.iter().enumerate() {
                // SAFETY: row `offset + i`, head `h0 + hh` belongs to this task alone, and
                // `o + d < total · heads · head_dim` (sizes checked above).
                unsafe { dst.write(o + d, a) };
            }
        }
    }
    ahead.rest();
    SCRATCH.with(|s| s.replace(scratch));
}

/// A task's working rows in [`group_rows_ahead`], kept per thread so that the step's thousands of
/// tasks (members × KV heads × layers) do not each allocate and free them.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    out: Vec<f32>,
    inv: Vec<f32>,
    list: Vec<(usize, usize, usize)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The output rows of `H` heads (scores `stride` apart in `e`, rows `hd` apart in `out`), all
/// columns, 64 at a time where they last. Returns `H`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weigh_heads<const H: usize, K: Kernel>(
    kernel: K,
    e: &[f32],
    stride: usize,
    inv: &[f32],
    values: &[f32],
    spans: &[(usize, usize, usize)],
    hd: usize,
    out: &mut [f32],
    ahead: &mut Cursor,
) -> usize {
    let e: [&[f32]; H] = std::array::from_fn(|h| &e[h * stride..(h + 1) * stride]);
    let inv: [f32; H] = std::array::from_fn(|h| inv[h]);
    let mut c = 0;
    while c < hd {
        let mut rows = out.chunks_exact_mut(hd);
        let o: [&mut [f32]; H] = std::array::from_fn(|_| rows.next().expect("H rows"));
        // SAFETY: `c + width ≤ hd` (hd a multiple of 16); the caller checked the CPU.
        c += unsafe {
            match (hd - c) / LANES {
                4.. => kernel.weigh::<H, 4>(e, inv, values, spans, c, hd, o, ahead),
                2 | 3 => kernel.weigh::<H, 2>(e, inv, values, spans, c, hd, o, ahead),
                _ => kernel.weigh::<H, 1>(e, inv, values, spans, c, hd, o, ahead),
            }
        };
    }
    H
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Kernel, Lanes, EXP_MIN, EXP_TAYLOR, LANES};
    use std::arch::x86_64::*;

    /// [`Kernel`] in AVX-512 intrinsics: [`super::Plain`]'s operations lane for lane.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512;

    /// [`super::reduce16`] of each of 16 registers at once: lane `4t + r` of the result is
    /// the sum of `a[t + 4r]` (the four halvings as shuffles between register pairs).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn reduce16x16(a: &[__m512; LANES]) -> __m512 {
        // 256-bit halves: lanes 0..8 of b[j] are a[2j]'s `x[m] + x[m + 8]`, lanes 8..16 a[2j+1]'s.
        let b: [__m512; 8] = std::array::from_fn(|j| {
            let (x, y) = (a[2 * j], a[2 * j + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        });
        // 128-bit quarters: quarter t of c[i] is a[4i + t]'s `+ [m + 4]`.
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        });
        // Pairs within quarters: quarter t of d[u] is (a[8u + t], a[8u + 4 + t])'s `+ [m + 2]`.
        let d: [__m512; 2] = std::array::from_fn(|u| {
            let (x, y) = (c[2 * u], c[2 * u + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            )
        });
        // Lane 4t + r: a[t + 4r]'s `+ [m + 1]`.
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(d[0], d[1]),
            _mm512_shuffle_ps::<0xDD>(d[0], d[1]),
        )
    }

    /// [`super::reduce16`] of one register.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn reduce16(v: __m512) -> f32 {
        let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0xEE>(v, v));
        let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0x55>(v, v));
        let v = _mm512_add_ps(v, _mm512_shuffle_ps::<0xEE>(v, v));
        let v = _mm512_add_ps(v, _mm512_shuffle_ps::<0x55>(v, v));
        _mm512_cvtss_f32(v)
    }

    /// [`super::exp_neg`] on 8 lanes of f64.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn exp_neg_pd(x: __m512d) -> __m256 {
        let x = _mm512_max_pd(x, _mm512_set1_pd(EXP_MIN));
        let n = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_pd(x, _mm512_set1_pd(std::f64::consts::LOG2_E)),
        );
        let r = _mm512_fmadd_pd(n, _mm512_set1_pd(-std::f64::consts::LN_2), x);
        let mut p = _mm512_set1_pd(EXP_TAYLOR[0]);
        for &c in &EXP_TAYLOR[1..] {
            p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c));
        }
        // `p · 2^n`, exact (`n ≥ −174`), then one rounding to f32.
        _mm512_cvtpd_ps(_mm512_scalef_pd(p, n))
    }

    /// [`super::exp_neg`] on 16 lanes.
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    unsafe fn exp_neg(x: __m512) -> __m512 {
        let lo = exp_neg_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
        let hi = exp_neg_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(
            _mm512_shuffle_f32x4::<0xEE>(x, x),
        )));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(_mm512_castps256_ps512(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    impl Kernel for Avx512 {
        #[inline(always)]
        unsafe fn dots(self, q: &[f32], keys: &[&[f32]; LANES]) -> Lanes {
            // Register i holds key 4·(i mod 4) + i / 4, so that the reduction's lane j is key j.
            let k: [*const f32; LANES] =
                std::array::from_fn(|i| keys[4 * (i % 4) + i / 4].as_ptr());
            let q = q.as_ptr();
            let hd = keys[0].len();
            let q0 = _mm512_loadu_ps(q);
            let mut a: [__m512; LANES] =
                std::array::from_fn(|i| _mm512_mul_ps(q0, _mm512_loadu_ps(k[i])));
            for c in (LANES..hd).step_by(LANES) {
                let qc = _mm512_loadu_ps(q.add(c));
                for (a, &k) in a.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k.add(c)), *a);
                }
            }
            let mut out = [0f32; LANES];
            _mm512_storeu_ps(out.as_mut_ptr(), reduce16x16(&a));
            out
        }

        #[inline(always)]
        unsafe fn exp_sum(self, s: &mut [f32]) -> f32 {
            let (n, p) = (s.len(), s.as_mut_ptr());
            let tail = |j: usize| -> __mmask16 { ((1u32 << (n - j).min(LANES)) - 1) as __mmask16 };
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for j in (0..n).step_by(LANES) {
                let x = _mm512_mask_loadu_ps(max, tail(j), p.add(j));
                max = _mm512_max_ps(max, x);
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            let mut sum = _mm512_setzero_ps();
            for j in (0..n).step_by(LANES) {
                let m = tail(j);
                let e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(j)), max));
                _mm512_mask_storeu_ps(p.add(j), m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
            }
            reduce16(sum)
        }

        #[inline(always)]
        unsafe fn weigh<const H: usize, const C: usize>(
            self,
            e: [&[f32]; H],
            inv: [f32; H],
            values: &[f32],
            spans: &[(usize, usize, usize)],
            c: usize,
            hd: usize,
            out: [&mut [f32]; H],
            ahead: &mut super::Cursor,
        ) -> usize {
            let mut acc = [[_mm512_setzero_ps(); C]; H];
            for &(at, from, to) in spans {
                let span = values[at..at + (to - from) * hd].as_ptr().add(c);
                for k in from..to {
                    ahead.issue::<{ super::AHEAD_PER_ROW }>();
                    let v: [__m512; C] = std::array::from_fn(|cc| {
                        _mm512_loadu_ps(span.add((k - from) * hd + cc * LANES))
                    });
                    for (acc, e) in acc.iter_mut().zip(&e) {
                        let w = _mm512_set1_ps(*e.get_unchecked(k));
                        for (a, &v) in acc.iter_mut().zip(&v) {
                            *a = _mm512_fmadd_ps(w, v, *a);
                        }
                    }
                }
            }
            for ((acc, out), &inv) in acc.iter().zip(out).zip(&inv) {
                for (cc, &a) in acc.iter().enumerate() {
                    let o = out.as_mut_ptr().add(c + cc * LANES);
                    _mm512_storeu_ps(o, _mm512_mul_ps(a, _mm512_set1_ps(inv)));
                }
            }
            LANES * C
        }
    }
}

/// One key at a time (head sizes that are not a multiple of 16): each dot product in 8 lanes
/// summed in order, `expf`, the values weighed in key order.
fn head_rows_sequential(r: &Rows, mi: usize, h: usize) {
    let Rows {
        g,
        members,
        q,
        keys,
        values,
        tables,
        bs,
        total,
        dst,
    } = *r;
    let (nh, nkv, hd) = (g.heads, g.kv_heads, g.head_dim);
    let (hs, bst) = (bs * hd, nkv * bs * hd);
    let rep = nh / nkv;
    let m = members[mi];
    let table = tables[mi];
    let kvh = h / rep;
    let slope = g.alibi.map_or(0.0, |a| a[h]);
    let mut scores = vec![0f32; m.start + m.len];
    let mut acc = vec![0f32; hd];
    for i in 0..m.len {
        let pos = m.start + i;
        let lo = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qrow = &q[(h * total + m.offset + i) * hd..][..hd];
        // Keys `lo..=pos` block by block (no division per key).
        let spans = (lo / bs..=pos / bs).map(|b| {
            let base = table[b] as usize * bst + kvh * hs;
            let (from, to) = ((b * bs).max(lo), ((b + 1) * bs).min(pos + 1));
            (base, from, to)
        });
        let mut max = f32::NEG_INFINITY;
        for (base, from, to) in spans.clone() {
            // In bounds: the table's blocks up to `start + len` were checked above.
            let block = &keys[base..base + hs];
            for (j, (score, key)) in scores[from..to]
                .iter_mut()
                .zip(block[(from % bs) * hd..].chunks_exact(hd))
                .enumerate()
            {
                *score = dot(qrow, key) * g.scale + slope * (from + j) as f32;
                max = max.max(*score);
            }
        }
        let mut sum = 0f32;
        for s in &mut scores[lo..=pos] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        acc.fill(0.0);
        for (base, from, to) in spans {
            let block = &values[base..base + hs];
            for (&e, value) in scores[from..to]
                .iter()
                .zip(block[(from % bs) * hd..].chunks_exact(hd))
            {
                let p = e * inv;
                for (a, &x) in acc.iter_mut().zip(value) {
                    *a += p * x;
                }
            }
        }
        let o = ((m.offset + i) * nh + h) * hd;
        for (d, &a) in acc.iter().enumerate() {
            // SAFETY: row `offset + i`, head `h` belongs to this (member, head) task alone,
            // and `o + d < total · heads · head_dim` (sizes checked above).
            unsafe { dst.write(o + d, a) };
        }
    }
}

/// Dot product in eight lanes (vectorizes without reassociating floats).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (x, y) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut s = lanes.iter().sum::<f32>();
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The geometry of `heads` query heads over `kv_heads` of size `head_dim`, scaled by
    /// 1/√head_dim as the model scales them.
    fn geometry<'a>(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        alibi: Option<&'a [f32]>,
    ) -> Geometry<'a> {
        Geometry {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
            alibi,
        }
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// `exp_neg` is f64 `exp` rounded to f32 over `[-104, 0]` (a million points, every one
    /// equal), 1 at 0, and 0 far below; the AVX-512 version gives the same bits.
    #[test]
    fn exp_neg_is_exp_correctly_rounded() {
        let xs: Vec<f32> = (0..=1_000_000).map(|i| -104.0 * i as f32 / 1e6).collect();
        let mut wrong = 0;
        for &x in &xs {
            if exp_neg(x) != (x as f64).exp() as f32 {
                wrong += 1;
            }
        }
        assert_eq!(wrong, 0, "{wrong} of {} not correctly rounded", xs.len());
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-1000.0), 0.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            let mut s = xs.clone();
            // SAFETY: AVX-512F and FMA were detected.
            let sum = unsafe { avx512::Avx512.exp_sum(&mut s) };
            // SAFETY: as above; the plain kernel needs nothing.
            let mut p = xs.clone();
            let want = unsafe { Plain.exp_sum(&mut p) };
            assert_eq!(s, p);
            assert_eq!(sum.to_bits(), want.to_bits());
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_sums_are_reduce16_bit_for_bit() {
        if !avx512() {
            return;
        }
        use std::arch::x86_64::*;
        let v = pseudo_random(16 * 16, 7);
        let a: [Lanes; LANES] = std::array::from_fn(|j| {
            std::array::from_fn(|l| v[j * LANES + l] * 10f32.powi((l as i32 % 5) - 2))
        });
        let want: Lanes = std::array::from_fn(|j| reduce16(&a[j]));
        // SAFETY: AVX-512F was detected.
        unsafe {
            // Register i holds row 4·(i mod 4) + i / 4 (as `dots` loads keys).
            let regs: [__m512; LANES] =
                std::array::from_fn(|i| _mm512_loadu_ps(a[4 * (i % 4) + i / 4].as_ptr()));
            let mut got = [0f32; LANES];
            _mm512_storeu_ps(got.as_mut_ptr(), avx512_reduce16x16(&regs));
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits));
        }
    }

    /// One member's attention, every head, through `rows` (a task function: member, first
    /// head, heads), the heads `group` at a time.
    #[allow(clippy::too_many_arguments)]
    fn run(
        g: &Geometry,
        member: Member,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        tables: &[&[u32]],
        bs: usize,
        group: usize,
        rows: &dyn Fn(&Rows, usize, usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; g.heads * member.len * g.head_dim];
        let members = [member];
        let r = Rows {
            g,
            members: &members,
            q,
            keys,
            values,
            tables,
            bs,
            total: member.len,
            dst: OutPtr(out.as_mut_ptr()),
        };
        for h in (0..g.heads).step_by(group) {
            rows(&r, 0, h, group);
        }
        out
    }

    /// Plain f64 attention of `run`'s member: the reference the kernels are held to.
    fn reference(
        g: &Geometry,
        member: Member,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        table: &[u32],
        bs: usize,
    ) -> Vec<f64> {
        let (nh, nkv, hd) = (g.heads, g.kv_heads, g.head_dim);
        let at =
            |h: usize, p: usize| table[p / bs] as usize * nkv * bs * hd + h * bs * hd + p % bs * hd;
        let mut out = vec![0f64; nh * member.len * hd];
        for i in 0..member.len {
            let pos = member.start + i;
            let lo = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qrow = &q[(h * member.len + i) * hd..][..hd];
                let slope = g.alibi.map_or(0.0, |a| a[h]) as f64;
                let s: Vec<f64> = (lo..=pos)
                    .map(|p| {
                        let k = &keys[at(kvh, p)..][..hd];
                        let d: f64 = qrow.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        d * g.scale as f64 + slope * p as f64
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (p, e) in (lo..=pos).zip(&e) {
                    let v = &values[at(kvh, p)..][..hd];
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] += e / sum * v[d] as f64;
                    }
                }
            }
        }
        out
    }

    /// Every row path against the f64 reference (largest difference under 2e-6, measured 5.0e-7; the outputs
    /// are averages of values in [-1, 1]); the AVX-512 and FMA-compiled kernels give the plain
    /// kernel's numbers bit for bit; grouping heads changes nothing. Head sizes 16 … 128
    /// (column blocks of 64, 32, 16), 24 (the one-key-at-a-time path), 5 heads per KV head
    /// (weighing 4 + 1 at once), a window, ALiBi, blocks that end mid-group, several rows.
    #[test]
    fn rows_match_reference_and_each_other() {
        let slopes = [0.5f32, 0.25, 0.125, 0.0625, 0.03, 0.01, 0.3, 0.2, 0.1, 0.05];
        for (hd, nh, window, alibi, len) in [
            (16, 6, None, None, 1),
            (24, 6, Some(11), None, 3),
            (48, 10, None, Some(&slopes[..]), 2),
            (64, 6, None, None, 1),
            (64, 6, Some(30), None, 5),
            (80, 10, Some(20), Some(&slopes[..]), 1),
            (128, 6, None, None, 4),
        ] {
            let (nkv, bs) = (2, 16);
            let g = geometry(nh, nkv, hd, window, alibi);
            let member = Member {
                start: 37,
                offset: 0,
                len,
            };
            let total = member.start + member.len;
            let blocks = total.div_ceil(bs);
            let q = pseudo_random(nh * member.len * hd, 1);
            let keys: Vec<f32> = pseudo_random(blocks * nkv * bs * hd, 2)
                .iter()
                .map(|x| x * 3.0)
                .collect();
            let values = pseudo_random(keys.len(), 3);
            // Blocks out of order in the pool.
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let tables = [&table[..]];
            let rep = nh / nkv;
            let run = |group, rows: &dyn Fn(&Rows, usize, usize, usize)| {
                run(&g, member, &q, &keys, &values, &tables, bs, group, rows)
            };
            let want = reference(&g, member, &q, &keys, &values, &table, bs);
            let grouped = run(rep, &head_group);
            let worst = grouped
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(worst < 2e-6, "head size {hd}: {worst:e} from the reference");
            assert_eq!(run(1, &head_group), grouped, "head size {hd}: grouping");
            if hd % LANES == 0 {
                let plain = run(rep, &|r, m, h, n| group_rows(r, m, h, n, Plain));
                #[cfg(target_arch = "x86_64")]
                {
                    if avx512() {
                        // SAFETY: AVX-512F and FMA were detected.
                        let fast = run(rep, &|r, m, h, n| unsafe { group_rows_avx512(r, m, h, n) });
                        assert_eq!(fast, plain, "head size {hd}: AVX-512");
                    }
                    if std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: FMA was detected.
                        let fma = run(rep, &|r, m, h, n| unsafe { group_rows_fma(r, m, h, n) });
                        assert_eq!(fma, plain, "head size {hd}: FMA");
                    }
                }
                assert_eq!(grouped, plain, "head size {hd}");
            }
        }
    }

    /// The step's path (`attend`: tasks shared out over threads, each asking for its values
    /// and the next task's keys as it goes) gives exactly what the plain-Rust kernel gives
    /// head by head with no prefetching, bit for bit: head sizes 16, 32, 64, 128 and 24 (the
    /// one-key-at-a-time path), 1, 3 and 4 heads per KV head, windows, ALiBi, block sizes 16
    /// and 7, contexts 1 to 300 (decode rows at and either side of block boundaries, prefill
    /// pieces), one member alone and many.
    #[test]
    fn attend_equals_plain_kernel_over_shapes() {
        let slopes: Vec<f32> = (0..16).map(|h| 0.5f32.powi(h + 1)).collect();
        // (cached positions, new positions) per member.
        let many: Vec<(usize, usize)> = vec![
            (0, 1),
            (1, 1),
            (15, 1),
            (16, 1),
            (17, 1),
            (31, 1),
            (47, 1),
            (100, 1),
            (255, 1),
            (299, 1),
            (30, 5),
            (0, 13),
        ];
        let alone = vec![(140usize, 1usize)];
        let mut cases = 0;
        for (hd, nh, nkv) in [(64, 9, 3), (16, 4, 4), (32, 8, 2), (128, 6, 2), (24, 6, 2)] {
            for (window, alibi, bs) in [
                (None, false, 16),
                (Some(50), false, 16),
                (None, true, 7),
                (Some(17), true, 7),
            ] {
                for shape in [&many, &alone] {
                    let g = geometry(nh, nkv, hd, window, alibi.then_some(&slopes[..nh]));
                    let got = attend_case(&g, shape, bs, cases as u32);
                    assert_eq!(
                        got.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        got.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "head size {hd}, {nh}/{nkv} heads, window {window:?}, ALiBi {alibi}, \
                         block size {bs}, {} members",
                        shape.len()
                    );
                    assert!(got.0.iter().all(|x| x.is_finite()));
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 40);
    }

    /// `attend` over members of `shape` ((cached, new) positions) in a shuffled pool, and the
    /// same rows from the plain kernel (or the one-key-at-a-time path) head by head.
    fn attend_case(
        g: &Geometry,
        shape: &[(usize, usize)],
        bs: usize,
        seed: u32,
    ) -> (Vec<f32>, Vec<f32>) {
        let (nh, nkv, hd) = (g.heads, g.kv_heads, g.head_dim);
        let need: Vec<usize> = shape.iter().map(|&(s, l)| (s + l).div_ceil(bs)).collect();
        let pool_blocks: usize = need.iter().sum::<usize>() + 3;
        // Blocks dealt out in a scrambled order.
        let mut order: Vec<u32> = (0..pool_blocks as u32).collect();
        let mut x = seed.wrapping_add(99);
        for i in (1..order.len()).rev() {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            order.swap(i, (x >> 8) as usize % (i + 1));
        }
        let mut tables: Vec<Vec<u32>> = Vec::new();
        let mut at = 0;
        for &n in &need {
            tables.push(order[at..at + n].to_vec());
            at += n;
        }
        let size = pool_blocks * nkv * bs * hd;
        let mut keys: Vec<f32> = pseudo_random(size, seed * 7 + 1)
            .iter()
            .map(|x| x * 3.0)
            .collect();
        let mut values = pseudo_random(size, seed * 7 + 2);
        let total: usize = shape.iter().map(|s| s.1).sum();
        let mut members = Vec::new();
        let mut offset = 0;
        for &(start, len) in shape {
            members.push(Member { start, offset, len });
            offset += len;
        }
        let q = pseudo_random(nh * total * hd, seed * 7 + 3);
        let k_new = pseudo_random(nkv * total * hd, seed * 7 + 4);
        let v_new = pseudo_random(nkv * total * hd, seed * 7 + 5);
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let mut out = vec![0f32; nh * total * hd];
        let pages = KvPages {
            keys: &mut keys,
            values: &mut values,
            tables: &table_refs,
            block_size: bs,
        };
        attend(g, &members, &q, &k_new, &v_new, pages, &mut out).unwrap();
        // The pool now holds the new rows too; the plain kernel reads it in place.
        let mut plain = vec![f32::NAN; out.len()];
        let r = Rows {
            g,
            members: &members,
            q: &q,
            keys: &keys,
            values: &values,
            tables: &table_refs,
            bs,
            total,
            dst: OutPtr(plain.as_mut_ptr()),
        };
        for mi in 0..members.len() {
            for h in 0..nh {
                if hd % LANES == 0 {
                    group_rows(&r, mi, h, 1, Plain);
                } else {
                    head_rows_sequential(&r, mi, h);
                }
            }
        }
        (out, plain)
    }

    /// Members of a pass over shuffled blocks get exactly what each gets alone over its keys
    /// laid out contiguously (the single-sequence path).
    #[test]
    fn paged_members_equal_contiguous_sequences() {
        let (nh, nkv, hd, bs) = (4, 2, 16, 4);
        let g = Geometry {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            scale: 0.25,
            window: None,
            alibi: None,
        };
        // (cached positions, new positions) per member.
        let shape = [(9usize, 1usize), (0, 6), (3, 1)];
        let mut tables: Vec<Vec<u32>> = Vec::new();
        for (i, &(start, len)) in shape.iter().enumerate() {
            let n = (start + len).div_ceil(bs) as u32;
            // Interleave members' blocks in the pool.
            tables.push((0..n).map(|b| b * 3 + i as u32).collect());
        }
        let pool_blocks = 3 * 4;
        let mut keys = vec![0f32; pool_blocks * nkv * bs * hd];
        let mut values = keys.clone();
        // Each member's full history, contiguous [kv_head, position, column].
        let history: Vec<(Vec<f32>, Vec<f32>)> = shape
            .iter()
            .enumerate()
            .map(|(i, &(s, l))| {
                let n = nkv * (s + l) * hd;
                (
                    pseudo_random(n, 10 + i as u32),
                    pseudo_random(n, 20 + i as u32),
                )
            })
            .collect();
        let total: usize = shape.iter().map(|s| s.1).sum();
        let mut members = Vec::new();
        let (mut k_new, mut v_new) = (vec![0f32; nkv * total * hd], vec![0f32; nkv * total * hd]);
        let mut offset = 0;
        for (i, &(start, len)) in shape.iter().enumerate() {
            let (hk, hv) = &history[i];
            for h in 0..nkv {
                for p in 0..start + len {
                    let src = (h * (start + len) + p) * hd;
                    if p < start {
                        let dst = tables[i][p / bs] as usize * nkv * bs * hd
                            + h * bs * hd
                            + (p % bs) * hd;
                        keys[dst..dst + hd].copy_from_slice(&hk[src..src + hd]);
                        values[dst..dst + hd].copy_from_slice(&hv[src..src + hd]);
                    } else {
                        let row = offset + p - start;
                        let kd = (h * total + row) * hd;
                        let vd = (row * nkv + h) * hd;
                        k_new[kd..kd + hd].copy_from_slice(&hk[src..src + hd]);
                        v_new[vd..vd + hd].copy_from_slice(&hv[src..src + hd]);
                    }
                }
            }
            members.push(Member { start, offset, len });
            offset += len;
        }
        let q = pseudo_random(nh * total * hd, 30);
        let mut out = vec![0f32; nh * total * hd];
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let pages = KvPages {
            keys: &mut keys,
            values: &mut values,
            tables: &table_refs,
            block_size: bs,
        };
        attend(&g, &members, &q, &k_new, &v_new, pages, &mut out).unwrap();
        for (i, m) in members.iter().enumerate() {
            let (hk, hv) = &history[i];
            let mut qm = vec![0f32; nh * m.len * hd];
            for h in 0..nh {
                for r in 0..m.len {
                    let src = (h * total + m.offset + r) * hd;
                    let dst = (h * m.len + r) * hd;
                    qm[dst..dst + hd].copy_from_slice(&q[src..src + hd]);
                }
            }
            let mut alone = vec![0f32; nh * m.len * hd];
            attend_contiguous(&g, m.start, m.len, &qm, hk, hv, &mut alone).unwrap();
            let width = nh * hd;
            assert_eq!(
                &out[m.offset * width..(m.offset + m.len) * width],
                &alone[..],
                "member {i}"
            );
        }
    }
}
