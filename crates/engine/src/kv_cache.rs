//! A contiguous KV cache for one sequence: per layer, one preallocated buffer for keys and one
//! for values, written in place as tokens arrive.

use camelid_model::transformer::KvStore;
use candle_core::Tensor;

pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    first_pass: Option<usize>,
}

impl KvCache {
    /// `capacity` positions are reserved up front; the buffers grow (by copying) only if a
    /// sequence outlives that guess, so size it as prompt + max new tokens.
    pub fn new(layers: usize, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            layers: (0..layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity))
                .collect(),
            first_pass: None,
        }
    }

    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.reset();
        }
        self.first_pass = None;
    }
}

impl KvStore for KvCache {
    fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.current_seq_len())
    }

    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match self.layers.get_mut(layer) {
            Some(l) => l.append(k, v),
            None => candle_core::bail!("KV cache has no layer {layer}"),
        }
    }

    fn first_pass_len(&self) -> Option<usize> {
        self.first_pass
    }

    fn set_first_pass_len(&mut self, len: usize) {
        self.first_pass = Some(len);
    }
}
