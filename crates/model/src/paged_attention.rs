//! Attention of a batched pass ([`crate::transformer::Transformer::forward_batch`]) read
//! straight from a paged KV pool: each member's new keys and values are written into its
//! blocks, and its queries attend over the blocks in place, with no copy of the cache and no
//! per-member tensor operations. Every (member, head) pair is one task; within it each query
//! row sums in a fixed order, so a row's result does not depend on the other members or on how
//! its sequence was cut into pieces.

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
    let task = |(mi, h): (usize, usize)| head_rows(&rows, mi, h);
    let work: usize = members
        .iter()
        .map(|m| m.len * (m.start + m.len))
        .sum::<usize>()
        * nh
        * hd;
    let pairs = (0..members.len()).flat_map(|m| (0..nh).map(move |h| (m, h)));
    if work < 1 << 16 || rayon::current_num_threads() == 1 {
        pairs.for_each(task);
    } else {
        pairs.collect::<Vec<_>>().into_par_iter().for_each(task);
    }
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

/// One member's rows for one head. Compiled for AVX2 where the CPU has it: the same
/// operations in the same order on wider registers (no fused multiply-add), so the results do
/// not depend on the path.
fn head_rows(r: &Rows, mi: usize, h: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU.
        return unsafe { head_rows_avx2(r, mi, h) };
    }
    head_rows_impl(r, mi, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn head_rows_avx2(r: &Rows, mi: usize, h: usize) {
    head_rows_impl(r, mi, h)
}

#[inline(always)]
fn head_rows_impl(r: &Rows, mi: usize, h: usize) {
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
