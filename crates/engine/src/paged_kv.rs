//! The paged KV cache of the server: keys and values live in fixed-size blocks of
//! `block_size` positions taken from one pool, sized once from a memory budget. A sequence
//! holds a block table (its blocks in position order), so sequences of any length share the
//! pool without reserving their maximum up front.
//!
//! Prefix caching: a full block is named by a hash chain over its tokens and every token
//! before it (the parent block's hash), so two prompts that start alike find the same blocks
//! and reuse their keys and values. Blocks are reference counted; a cached block nobody holds
//! stays cached until the pool needs it, and then the least recently released goes first.

use camelid_model::paged_attention::KvPages;
use camelid_model::transformer::BatchKvStore;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;

#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions per block.
    pub block_size: usize,
}

impl PoolShape {
    /// Bytes one block holds: keys and values (f32) of every layer.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.block_size * 4
    }

    /// How many blocks fit in `bytes` (at least one).
    pub fn blocks_in(&self, bytes: usize) -> usize {
        (bytes / self.block_bytes().max(1)).max(1)
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    /// Set while the block is in the prefix cache.
    hash: Option<u64>,
    /// The tokens the hash names (checked on lookup, so a hash collision cannot mix contexts).
    tokens: Vec<u32>,
    parent: u64,
    released_at: u64,
}

/// Counters the server reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Unheld and cached (reusable by a prefix hit, evictable).
    pub cached_free: usize,
    pub evictions: u64,
}

pub struct BlockPool {
    shape: PoolShape,
    /// Per layer: `[block][kv_head][slot][head_dim]` keys and values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    meta: Vec<BlockMeta>,
    /// Unheld, uncached blocks.
    free: Vec<BlockId>,
    /// Unheld cached blocks by release time: the eviction order.
    evictable: BTreeSet<(u64, BlockId)>,
    by_hash: HashMap<u64, BlockId>,
    clock: u64,
    evictions: u64,
    device: Device,
}

/// The hash of a full block: its tokens after everything its parent hash names.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockPool {
    pub fn new(shape: PoolShape, blocks: usize, device: &Device) -> Self {
        let per_layer = blocks * shape.kv_heads * shape.block_size * shape.head_dim;
        Self {
            shape,
            keys: (0..shape.layers).map(|_| vec![0f32; per_layer]).collect(),
            values: (0..shape.layers).map(|_| vec![0f32; per_layer]).collect(),
            meta: vec![BlockMeta::default(); blocks],
            free: (0..blocks as BlockId).rev().collect(),
            evictable: BTreeSet::new(),
            by_hash: HashMap::new(),
            clock: 0,
            evictions: 0,
            device: device.clone(),
        }
    }

    pub fn shape(&self) -> PoolShape {
        self.shape
    }

    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }

    pub fn total(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that can be handed out now (free, or cached and unheld).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.total(),
            used: self.total() - self.available(),
            cached_free: self.evictable.len(),
            evictions: self.evictions,
        }
    }

    /// A block for new keys and values: a free one, else the least recently released cached
    /// one (which leaves the cache). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let first = *self.evictable.iter().next()?;
                self.evictable.remove(&first);
                let id = first.1;
                if let Some(h) = self.meta[id as usize].hash.take() {
                    self.by_hash.remove(&h);
                }
                self.evictions += 1;
                id
            }
        };
        let m = &mut self.meta[id as usize];
        m.refs = 1;
        m.tokens.clear();
        Some(id)
    }

    /// Drops one holder of `id`; an unheld block stays reusable from the cache if it is named.
    pub fn release(&mut self, id: BlockId) {
        self.clock += 1;
        let m = &mut self.meta[id as usize];
        debug_assert!(m.refs > 0, "block {id} released more often than held");
        m.refs = m.refs.saturating_sub(1);
        if m.refs == 0 {
            if m.hash.is_some() {
                m.released_at = self.clock;
                self.evictable.insert((self.clock, id));
            } else {
                self.free.push(id);
            }
        }
    }

    /// The cached block holding `tokens` after the context named `parent`, now held once more.
    pub fn lookup(&mut self, parent: u64, tokens: &[u32]) -> Option<BlockId> {
        let hash = block_hash(parent, tokens);
        let id = *self.by_hash.get(&hash)?;
        let m = &mut self.meta[id as usize];
        if m.parent != parent || m.tokens != tokens {
            return None;
        }
        if m.refs == 0 {
            self.evictable.remove(&(m.released_at, id));
        }
        m.refs += 1;
        Some(id)
    }

    /// Names the full block `id` (held by the caller) so later prompts can reuse it. Returns
    /// its hash. When another block already has this content, `id` stays unnamed.
    pub fn register(&mut self, id: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        let hash = block_hash(parent, tokens);
        if self.meta[id as usize].hash.is_none() && !self.by_hash.contains_key(&hash) {
            let m = &mut self.meta[id as usize];
            m.hash = Some(hash);
            m.parent = parent;
            m.tokens = tokens.to_vec();
            self.by_hash.insert(hash, id);
        }
        hash
    }

    /// Holders of `id` (tests and leak checks).
    pub fn refs(&self, id: BlockId) -> u32 {
        self.meta[id as usize].refs
    }

    fn head_stride(&self) -> usize {
        self.shape.block_size * self.shape.head_dim
    }

    fn block_stride(&self) -> usize {
        self.shape.kv_heads * self.head_stride()
    }

    /// Writes `[1, kv_heads, t, head_dim]` keys and values at positions `start..start + t`
    /// of the sequence whose blocks are `table`.
    fn write(
        &mut self,
        layer: usize,
        table: &[BlockId],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let (_, heads, t, hd) = k.dims4()?;
        let bs = self.shape.block_size;
        let (hs, bst) = (self.head_stride(), self.block_stride());
        for (src, dst) in [(k, &mut self.keys[layer]), (v, &mut self.values[layer])] {
            let data = src.flatten_all()?.to_vec1::<f32>()?;
            for h in 0..heads {
                for i in 0..t {
                    let pos = start + i;
                    let Some(&block) = table.get(pos / bs) else {
                        candle_core::bail!("position {pos} has no KV block");
                    };
                    let at = block as usize * bst + h * hs + (pos % bs) * hd;
                    let from = (h * t + i) * hd;
                    dst[at..at + hd].copy_from_slice(&data[from..from + hd]);
                }
            }
        }
        Ok(())
    }

    /// Keys and values of positions `0..len` as `[1, kv_heads, len, head_dim]` tensors.
    fn gather(
        &self,
        layer: usize,
        table: &[BlockId],
        len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (heads, hd, bs) = (
            self.shape.kv_heads,
            self.shape.head_dim,
            self.shape.block_size,
        );
        let (hs, bst) = (self.head_stride(), self.block_stride());
        let gather_one = |src: &[f32]| {
            let mut out = Vec::with_capacity(heads * len * hd);
            for h in 0..heads {
                let mut pos = 0;
                for &block in table {
                    if pos >= len {
                        break;
                    }
                    let n = bs.min(len - pos);
                    let at = block as usize * bst + h * hs;
                    out.extend_from_slice(&src[at..at + n * hd]);
                    pos += n;
                }
            }
            out
        };
        let shape = (1, heads, len, hd);
        Ok((
            Tensor::from_vec(gather_one(&self.keys[layer]), shape, &self.device)?,
            Tensor::from_vec(gather_one(&self.values[layer]), shape, &self.device)?,
        ))
    }
}

/// The sequences of one batched pass over the pool: each with its block table (already long
/// enough for this pass's tokens) and the positions it had stored before the pass.
pub struct PagedBatch<'a> {
    pub pool: &'a mut BlockPool,
    pub tables: Vec<&'a [BlockId]>,
    pub starts: Vec<usize>,
}

impl BatchKvStore for PagedBatch<'_> {
    fn seq_len(&self, seq: usize) -> usize {
        self.starts[seq]
    }

    fn append(
        &mut self,
        seq: usize,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let start = self.starts[seq];
        let t = k.dim(2)?;
        // The pool keeps f32 on the host: a model computing in f16/bf16 (on a GPU) gets its own
        // type back (no-ops for f32).
        let (k32, v32) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        self.pool
            .write(layer, self.tables[seq], start, &k32, &v32)?;
        let (keys, values) = self.pool.gather(layer, self.tables[seq], start + t)?;
        Ok((keys.to_dtype(k.dtype())?, values.to_dtype(v.dtype())?))
    }

    fn pages(&mut self, layer: usize) -> Option<KvPages<'_>> {
        let block_size = self.pool.shape.block_size;
        let pool = &mut *self.pool;
        Some(KvPages {
            keys: pool.keys.get_mut(layer)?,
            values: pool.values.get_mut(layer)?,
            tables: &self.tables,
            block_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> BlockPool {
        let shape = PoolShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 4,
            block_size: 2,
        };
        BlockPool::new(shape, blocks, &Device::Cpu)
    }

    #[test]
    fn allocate_until_empty_then_release() {
        let mut p = pool(3);
        let ids: Vec<_> = (0..3).map(|_| p.allocate().expect("block")).collect();
        assert!(p.allocate().is_none());
        assert_eq!(p.stats().used, 3);
        for id in ids {
            p.release(id);
        }
        assert_eq!(p.stats().used, 0);
        assert_eq!(p.available(), 3);
    }

    #[test]
    fn prefix_blocks_are_shared_and_evicted_least_recent_first() {
        let mut p = pool(2);
        let a = p.allocate().expect("a");
        let b = p.allocate().expect("b");
        let ha = p.register(a, 0, &[1, 2]);
        p.register(b, ha, &[3, 4]);
        // A second holder of the same prefix.
        assert_eq!(p.lookup(0, &[1, 2]), Some(a));
        assert_eq!(p.refs(a), 2);
        // Same tokens under another parent are another block.
        assert_eq!(p.lookup(7, &[1, 2]), None);
        p.release(a);
        p.release(a);
        p.release(b);
        // Both unheld but cached: a was released first, so it is evicted first.
        assert_eq!(p.stats().cached_free, 2);
        let c = p.allocate().expect("c");
        assert_eq!(c, a);
        assert_eq!(p.lookup(0, &[1, 2]), None);
        assert_eq!(p.lookup(ha, &[3, 4]), Some(b));
        assert_eq!(p.stats().evictions, 1);
    }

    #[test]
    fn paged_append_reads_back_what_was_written() {
        let mut p = pool(4);
        let table = vec![p.allocate().expect("x"), p.allocate().expect("y")];
        // Three positions, written as 2 then 1.
        let k: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let k = Tensor::from_vec(k, (1, 2, 3, 4), &Device::Cpu).expect("k");
        let v = (&k * 10.0).expect("v");
        let mut batch = PagedBatch {
            pool: &mut p,
            tables: vec![&table],
            starts: vec![0],
        };
        batch
            .append(
                0,
                0,
                &k.narrow(2, 0, 2).expect("n"),
                &v.narrow(2, 0, 2).expect("n"),
            )
            .expect("append");
        batch.starts[0] = 2;
        let (ka, va) = batch
            .append(
                0,
                0,
                &k.narrow(2, 2, 1).expect("n"),
                &v.narrow(2, 2, 1).expect("n"),
            )
            .expect("append");
        let flat = |t: &Tensor| t.flatten_all().expect("f").to_vec1::<f32>().expect("v");
        assert_eq!(flat(&ka), flat(&k));
        assert_eq!(flat(&va), flat(&v));
    }
}
