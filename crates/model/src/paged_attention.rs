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
    // A task is a member's rows for a run of heads: a decode row's heads that share keys and
    // values go together (those are read from memory once, then from cache), a longer
    // member's heads one by one (more tasks to share out). How the work is cut does not
    // change any row's result.
    let rep = nh / g.kv_heads;
    let task = |(mi, h0, n): (usize, usize, usize)| {
        for h in h0..h0 + n {
            head_rows(&rows, mi, h);
        }
    };
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

/// One member's rows for one head. Head sizes that are a multiple of 8 take
/// [`head_rows_lanes`] (8 keys at a time, compiled for AVX2 where the CPU has it), others
/// [`head_rows_sequential`] (one key at a time). Both do the same operations in the same order,
/// so a row's numbers do not depend on the path (tested bit for bit).
fn head_rows(r: &Rows, mi: usize, h: usize) {
    if r.g.head_dim.is_multiple_of(LANES) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected on this CPU.
            return unsafe { head_rows_lanes_avx2(r, mi, h) };
        }
        return head_rows_lanes(r, mi, h, lane_sums);
    }
    head_rows_sequential(r, mi, h)
}

/// Lanes of the attention's vectors (one AVX2 register of f32).
const LANES: usize = 8;

type Lanes = [f32; LANES];

/// `((x0 + x1) + x2) + … + x7`: a dot product's 8 lane sums added in order, as
/// [`head_rows_sequential`]'s `dot` adds them.
#[inline(always)]
fn lane_sum(x: &Lanes) -> f32 {
    x[1..].iter().fold(x[0], |s, &v| s + v)
}

/// `out[j] = lane_sum(a[j])`.
#[inline(always)]
fn lane_sums(a: &[Lanes; LANES]) -> Lanes {
    let mut out = [0f32; LANES];
    for (o, a) in out.iter_mut().zip(a) {
        *o = lane_sum(a);
    }
    out
}

/// [`lane_sums`] for 8 keys at once: an 8×8 transpose, then the 8 rows (lane 0 of every key,
/// lane 1, …) added in order. The same additions, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lane_sums_avx2(a: &[Lanes; LANES]) -> Lanes {
    use std::arch::x86_64::*;
    let mut v = [_mm256_setzero_ps(); LANES];
    for (v, a) in v.iter_mut().zip(a) {
        *v = _mm256_loadu_ps(a.as_ptr());
    }
    // Pairs, then quads, then halves: t[l] holds lane l of keys 0..8.
    let u0 = _mm256_unpacklo_ps(v[0], v[1]);
    let u1 = _mm256_unpackhi_ps(v[0], v[1]);
    let u2 = _mm256_unpacklo_ps(v[2], v[3]);
    let u3 = _mm256_unpackhi_ps(v[2], v[3]);
    let u4 = _mm256_unpacklo_ps(v[4], v[5]);
    let u5 = _mm256_unpackhi_ps(v[4], v[5]);
    let u6 = _mm256_unpacklo_ps(v[6], v[7]);
    let u7 = _mm256_unpackhi_ps(v[6], v[7]);
    let w0 = _mm256_shuffle_ps::<0x44>(u0, u2);
    let w1 = _mm256_shuffle_ps::<0xEE>(u0, u2);
    let w2 = _mm256_shuffle_ps::<0x44>(u1, u3);
    let w3 = _mm256_shuffle_ps::<0xEE>(u1, u3);
    let w4 = _mm256_shuffle_ps::<0x44>(u4, u6);
    let w5 = _mm256_shuffle_ps::<0xEE>(u4, u6);
    let w6 = _mm256_shuffle_ps::<0x44>(u5, u7);
    let w7 = _mm256_shuffle_ps::<0xEE>(u5, u7);
    let t = [
        _mm256_permute2f128_ps::<0x20>(w0, w4),
        _mm256_permute2f128_ps::<0x20>(w1, w5),
        _mm256_permute2f128_ps::<0x20>(w2, w6),
        _mm256_permute2f128_ps::<0x20>(w3, w7),
        _mm256_permute2f128_ps::<0x31>(w0, w4),
        _mm256_permute2f128_ps::<0x31>(w1, w5),
        _mm256_permute2f128_ps::<0x31>(w2, w6),
        _mm256_permute2f128_ps::<0x31>(w3, w7),
    ];
    let mut sum = t[0];
    for &t in &t[1..] {
        sum = _mm256_add_ps(sum, t);
    }
    let mut out = [0f32; LANES];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn head_rows_lanes_avx2(r: &Rows, mi: usize, h: usize) {
    // SAFETY: this function is only called where AVX2 was detected.
    head_rows_lanes(r, mi, h, |a| unsafe { lane_sums_avx2(a) })
}

/// Attention of one member's rows for one head, the head size a multiple of 8, with
/// [`head_rows_sequential`]'s arithmetic:
/// - the scores 8 keys at a time (8 independent sums, not one key's long chain), each key's
///   dot product summed in 8 lanes over the columns in order, then over the lanes by
///   [`lane_sum`] (`sums` takes 8 keys at once);
/// - `e^(s − max)` (`expf`), summed in key order;
/// - each output column `Σ (e_k · (1 / sum)) · v_k` in key order, a block of columns at a time
///   with its sums in registers.
#[inline(always)]
fn head_rows_lanes(r: &Rows, mi: usize, h: usize, sums: impl Fn(&[Lanes; LANES]) -> Lanes) {
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
    let cols = hd / LANES;
    // Room for a whole group of 8 past the last key.
    let mut scores = vec![0f32; m.start + m.len + LANES];
    let mut out = vec![0f32; hd];
    let mut list = Vec::new();
    for i in 0..m.len {
        let pos = m.start + i;
        let lo = g.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qrow = &q[(h * total + m.offset + i) * hd..][..hd];
        // Keys `lo..=pos` block by block: (where the span's first key is stored, its
        // position, the position after its last).
        let spans = (lo / bs..=pos / bs).map(|b| {
            let (from, to) = ((b * bs).max(lo), ((b + 1) * bs).min(pos + 1));
            let at = table[b] as usize * bst + kvh * hs + (from - b * bs) * hd;
            (at, from, to)
        });
        list.clear();
        list.extend(spans);
        for &(at, from, to) in &list {
            // In bounds: the table's blocks up to `start + len` were checked above.
            let span = &keys[at..at + (to - from) * hd];
            let mut j = from;
            while j < to {
                // A group running past the span repeats its last key (computed, not kept).
                let mut key: [&[f32]; LANES] = [&[]; LANES];
                for (k, key) in key.iter_mut().enumerate() {
                    let p = (j + k).min(to - 1) - from;
                    *key = &span[p * hd..(p + 1) * hd];
                }
                let mut dots = [[0f32; LANES]; LANES];
                for c in 0..cols {
                    let qc = &qrow[c * LANES..(c + 1) * LANES];
                    for (d, key) in dots.iter_mut().zip(&key) {
                        // SAFETY: every key row holds `hd = cols · 8` values.
                        let kc = unsafe { key.get_unchecked(c * LANES..(c + 1) * LANES) };
                        for l in 0..LANES {
                            d[l] += qc[l] * kc[l];
                        }
                    }
                }
                let s = sums(&dots);
                let n = (to - j).min(LANES);
                for (k, (&s, score)) in s.iter().zip(&mut scores[j..j + n]).enumerate() {
                    *score = s * g.scale + slope * (j + k) as f32;
                }
                j += n;
            }
        }
        let max = scores[lo..=pos]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in &mut scores[lo..=pos] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        let mut c = 0;
        while c < hd {
            let (e, v) = (&scores[..], values);
            c += match hd - c {
                64.. => weigh_values::<64>(e, inv, v, list.iter().copied(), c, hd, &mut out),
                32..=63 => weigh_values::<32>(e, inv, v, list.iter().copied(), c, hd, &mut out),
                16..=31 => weigh_values::<16>(e, inv, v, list.iter().copied(), c, hd, &mut out),
                _ => weigh_values::<8>(e, inv, v, list.iter().copied(), c, hd, &mut out),
            };
        }
        let o = ((m.offset + i) * nh + h) * hd;
        for (d, &a) in out.iter().enumerate() {
            // SAFETY: row `offset + i`, head `h` belongs to this (member, head) task alone,
            // and `o + d < total · heads · head_dim` (sizes checked above).
            unsafe { dst.write(o + d, a) };
        }
    }
}

/// Columns `c .. c + N` of the output, `Σ (e_k · inv) · v_k` over the spans' keys in order,
/// the `N` sums kept in registers across the keys. Returns `N`.
#[inline(always)]
fn weigh_values<const N: usize>(
    e: &[f32],
    inv: f32,
    values: &[f32],
    spans: impl Iterator<Item = (usize, usize, usize)>,
    c: usize,
    hd: usize,
    out: &mut [f32],
) -> usize {
    let mut acc = [0f32; N];
    for (at, from, to) in spans {
        let span = &values[at..at + (to - from) * hd];
        for (&e, value) in e[from..to].iter().zip(span.chunks_exact(hd)) {
            let p = e * inv;
            let v: &[f32; N] = value[c..c + N].try_into().expect("N columns");
            for l in 0..N {
                acc[l] += p * v[l];
            }
        }
    }
    out[c..c + N].copy_from_slice(&acc);
    N
}

/// One key at a time (head sizes that are not a multiple of 8): each dot product in 8 lanes
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

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lane_sums_avx2_are_the_plain_sums_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for seed in 0..50 {
            let v = pseudo_random(64, seed);
            let a: [Lanes; LANES] = std::array::from_fn(|j| {
                std::array::from_fn(|l| v[j * LANES + l] * 10f32.powi((l as i32 % 5) - 2))
            });
            // SAFETY: AVX2 was detected.
            let fast = unsafe { lane_sums_avx2(&a) };
            assert_eq!(fast.map(f32::to_bits), lane_sums(&a).map(f32::to_bits));
        }
    }

    /// One member's attention, every head, through `rows` (one of the row functions).
    #[allow(clippy::too_many_arguments)]
    fn run(
        g: &Geometry,
        member: Member,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        tables: &[&[u32]],
        bs: usize,
        rows: fn(&Rows, usize, usize),
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
        for h in 0..g.heads {
            rows(&r, 0, h);
        }
        out
    }

    /// The lane-wise rows (plain and AVX2) give the one-key-at-a-time rows' numbers bit for bit:
    /// head sizes 8, 24 (column blocks of 16 + 8) and 64, grouped heads, a window, ALiBi,
    /// blocks that end mid-group.
    #[test]
    fn lane_rows_match_sequential_rows() {
        let slopes = [0.5f32, 0.25, 0.125, 0.0625, 0.03, 0.01];
        for (hd, window, alibi) in [
            (8, None, None),
            (24, Some(11), None),
            (64, None, Some(&slopes[..])),
            (64, Some(30), None),
        ] {
            let (nh, nkv, bs) = (6, 2, 16);
            let g = Geometry {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                alibi,
            };
            let member = Member {
                start: 37,
                offset: 0,
                len: 5,
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
            let want = run(
                &g,
                member,
                &q,
                &keys,
                &values,
                &tables,
                bs,
                head_rows_sequential,
            );
            let plain = run(&g, member, &q, &keys, &values, &tables, bs, |r, m, h| {
                head_rows_lanes(r, m, h, lane_sums)
            });
            assert_eq!(plain, want, "head size {hd}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let fast = run(&g, member, &q, &keys, &values, &tables, bs, |r, m, h| {
                    // SAFETY: AVX2 was detected.
                    unsafe { head_rows_lanes_avx2(r, m, h) }
                });
                assert_eq!(fast, plain, "head size {hd}");
            }
        }
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
