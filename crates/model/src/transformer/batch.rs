//! The batched pass: several sequences' new tokens through the one transformer in a single
//! forward pass ([`Transformer::forward_batch`]), the serving engine's step. Over a paged pool,
//! pre-norm RMSNorm decoders run their blocks on plain rows with parallel row kernels
//! ([`crate::rows`]); every other model by the tensor ops [`Transformer::forward`] uses.

use super::*;

/// Keys and values of the several sequences of one batched pass
/// ([`Transformer::forward_batch`]); sequence `seq` of the batch reads and writes only its own.
pub trait BatchKvStore {
    /// Positions stored for `seq` before this pass (the store advances after the pass).
    fn seq_len(&self, seq: usize) -> usize;
    /// As [`KvStore::append`], for sequence `seq` of the batch.
    fn append(
        &mut self,
        seq: usize,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)>;
    /// `layer` of a paged pool lent for the pass, when the store has one: attention then reads
    /// and writes the blocks in place ([`crate::paged_attention`]) instead of going through
    /// [`BatchKvStore::append`].
    fn pages(&mut self, _layer: usize) -> Option<crate::paged_attention::KvPages<'_>> {
        None
    }
}

/// Which logits a member of a batched pass wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One member of a batched pass: new tokens of a sequence, and the logits wanted.
pub struct BatchSeq<'a> {
    pub ids: &'a [u32],
    pub logits: Logits,
}

/// One batch member seen as a [`KvStore`], so the per-sequence attention code is shared.
struct BatchMember<'a> {
    store: &'a mut dyn BatchKvStore,
    seq: usize,
}

impl KvStore for BatchMember<'_> {
    fn seq_len(&self) -> usize {
        self.store.seq_len(self.seq)
    }

    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.store.append(self.seq, layer, k, v)
    }
}

/// Per-sequence attention inputs of a batched pass.
struct SeqSlice {
    start: usize,
    offset: usize,
    len: usize,
    rotary: Option<(Tensor, Tensor)>,
    causal: Option<Tensor>,
    windowed: Option<Tensor>,
    alibi: Option<Tensor>,
}

impl Transformer {
    /// Several sequences in one pass, each after its own cached positions: their new tokens
    /// are laid end to end as one `[1, total, hidden]` activation for the embeddings, norms,
    /// projections, MLP and head (the matmuls), and only rotary, the cache and attention run
    /// per member. Returns each member's logits `[rows, vocab]` as it asked (`None` for
    /// [`Logits::None`]). Gives what [`Self::forward`] gives per sequence.
    ///
    /// Members attend in order within each layer, so consecutive pieces of one sequence
    /// (`seq_len` of each the end of the previous) may share a pass: a piece sees the keys its
    /// predecessors stored. Every member's result depends only on its own tokens and cache,
    /// never on the other members, since all row-wise work is per row.
    ///
    /// Over a paged pool, a model whose blocks [`Self::row_blocks`] accepts (pre-norm RMSNorm
    /// decoders such as LLaMA, Mistral, Qwen2, SmolLM2) runs its blocks on plain rows with
    /// parallel row kernels ([`Self::blocks_rows`]); every other model by tensor ops
    /// ([`Self::blocks_batch`]). Both give the same bits.
    pub fn forward_batch(
        &self,
        seqs: &[BatchSeq],
        cache: &mut dyn BatchKvStore,
    ) -> Result<Vec<Option<Tensor>>> {
        self.forward_batch_with(seqs, cache, true)
    }

    /// [`Self::forward_batch`] with the logits as plain rows in `logits`, whose buffers the
    /// next pass reuses (a serving step reads 32 rows of a 49,152-token vocabulary: 6 MB it
    /// need not allocate, clear and copy out of a tensor each step). The same numbers.
    pub fn forward_batch_into(
        &self,
        seqs: &[BatchSeq],
        cache: &mut dyn BatchKvStore,
        logits: &mut BatchLogits,
    ) -> Result<()> {
        self.forward_batch_into_with(seqs, cache, true, logits)
    }

    /// [`Self::forward_batch`]; `on_rows: false` keeps the tensor ops where
    /// [`Self::blocks_rows`] and the head on plain rows would run (the tests compare the two).
    fn forward_batch_with(
        &self,
        seqs: &[BatchSeq],
        cache: &mut dyn BatchKvStore,
        on_rows: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut logits = BatchLogits::default();
        self.forward_batch_into_with(seqs, cache, on_rows, &mut logits)?;
        let vocab = logits.vocab();
        (0..seqs.len())
            .map(|i| {
                logits
                    .rows(i)
                    .map(|r| Tensor::from_slice(r, (r.len() / vocab.max(1), vocab), &self.device))
                    .transpose()
                    .map_err(Into::into)
            })
            .collect()
    }

    fn forward_batch_into_with(
        &self,
        seqs: &[BatchSeq],
        cache: &mut dyn BatchKvStore,
        on_rows: bool,
        logits: &mut BatchLogits,
    ) -> Result<()> {
        let head = self.head.as_ref().ok_or_else(|| {
            ModelError::Input(format!(
                "{} is an encoder without a language-model head: use it for embeddings",
                self.spec.family
            ))
        })?;
        if self.spec.stack != Stack::Single || self.rel_bias.is_some() {
            return Err(ModelError::Input(format!(
                "{} (an encoder-decoder or relative-position model) is not run by the batched forward",
                self.spec.family
            )));
        }
        logits.spans.clear();
        if seqs.is_empty() {
            return Ok(());
        }
        let vocab = self.spec.vocab_size as u32;
        let mut ids = Vec::new();
        let mut members = Vec::with_capacity(seqs.len());
        let mut positions = Vec::new();
        for (i, seq) in seqs.iter().enumerate() {
            let (start, t) = (cache.seq_len(i), seq.ids.len());
            if t == 0 {
                return Err(ModelError::Input(format!(
                    "batch sequence {i} has no tokens"
                )));
            }
            if start + t > self.spec.max_positions {
                return Err(ModelError::Input(format!(
                    "{} tokens exceed the model's context window of {} positions",
                    start + t,
                    self.spec.max_positions
                )));
            }
            if let Some(bad) = seq.ids.iter().find(|&&id| id >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {bad} is outside the vocabulary (size {vocab})"
                )));
            }
            if let (Some(pe), Positions::Learned { offset }) =
                (&self.position_embed, &self.spec.positions)
            {
                positions.push(pe.narrow(0, start + offset, t)?);
            }
            members.push(crate::paged_attention::Member {
                start,
                offset: ids.len(),
                len: t,
            });
            ids.extend_from_slice(seq.ids);
        }
        let total = ids.len();
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?;
        if let Some(p) = &self.proj_in {
            x = p.forward(&x)?;
        }
        if !positions.is_empty() {
            x = x.broadcast_add(&Tensor::cat(&positions, 0)?)?;
        }
        if let Some(types) = &self.token_type_embed {
            x = x.broadcast_add(&types.narrow(0, 0, 1)?)?;
        }
        if let Some(n) = &self.embed_norm {
            x = n.forward(&x)?;
        }
        let x = if on_rows
            && self.row_blocks()
            && (0..self.blocks.len()).all(|l| cache.pages(l).is_some())
        {
            self.blocks_rows(&x, &members, cache, &mut logits.blocks)?
        } else {
            self.blocks_batch(x, &members, cache)?
        };
        // The head reads only the rows asked for; the final norm and projection are row-wise,
        // so they run on those rows alone.
        let mut rows = Vec::new();
        for (seq, m) in seqs.iter().zip(&members) {
            let first = rows.len();
            match seq.logits {
                Logits::All => rows.extend(m.offset..m.offset + m.len),
                Logits::Last => rows.push(m.offset + m.len - 1),
                Logits::None => {}
            }
            logits
                .spans
                .push((rows.len() > first).then(|| (first, rows.len() - first)));
        }
        if rows.is_empty() {
            return Ok(());
        }
        if on_rows && self.row_head(head, &x) {
            return self.head_rows(head, &x, &rows, logits);
        }
        let mut x = if rows.len() == total {
            x
        } else {
            let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 1)?
        };
        if let Some(n) = &self.final_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.proj_out {
            x = p.forward(&x)?;
        }
        let l = head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
        logits.vocab = l.dim(1)?;
        logits.data.resize_with(1, Vec::new);
        let data = &mut logits.data[0];
        data.clear();
        with_f32_slice(&l, |s| data.extend_from_slice(s))?;
        Ok(())
    }

    /// The head's end runs on plain rows ([`Self::head_rows`]): f32 activations, an RMSNorm
    /// (or none) before a head that camelid's kernels run, no projection between.
    fn row_head(&self, head: &Linear, x: &Tensor) -> bool {
        x.dtype() == DType::F32
            && self.proj_out.is_none()
            && head.compute.is_none()
            && !head.flat
            && KernelGroup::of(&[head]).is_some()
            && self.final_norm.as_ref().is_none_or(|n| {
                n.kind == NormKind::RmsNorm && !n.differentiable && n.weight.dtype() == DType::F32
            })
    }

    /// The final norm and the head of `rows` of `x` (`[1, total, hidden]`) on plain rows, into
    /// `logits`' reused buffers: the numbers of the tensor ops (the row norm is candle's
    /// RMSNorm to the bit; the head is the same kernel product).
    fn head_rows(
        &self,
        head: &Linear,
        x: &Tensor,
        rows: &[usize],
        logits: &mut BatchLogits,
    ) -> Result<()> {
        let hidden = x.dim(D::Minus1)?;
        let BatchLogits {
            data,
            vocab,
            picked,
            normed,
            ..
        } = logits;
        picked.clear();
        with_f32_slice(x, |xs| {
            for &r in rows {
                picked.extend_from_slice(&xs[r * hidden..(r + 1) * hidden]);
            }
        })?;
        let input = match &self.final_norm {
            Some(n) => {
                normed.resize(picked.len(), 0.0);
                crate::rows::rms_norm(picked, &n.weight.to_vec1::<f32>()?, n.eps, normed);
                normed.as_slice()
            }
            None => picked.as_slice(),
        };
        Linear::products_into(&[head], input, rows.len(), &self.device, data)?;
        *vocab = data.first().map_or(0, |d| d.len() / rows.len());
        Ok(())
    }
}

/// The logits of a batched pass as plain rows ([`Transformer::forward_batch_into`]), kept from
/// pass to pass so that their buffers (and the blocks' working buffers) are reused: the
/// members' rows end to end, in member order, [`BatchLogits::vocab`] wide.
#[derive(Debug, Default)]
pub struct BatchLogits {
    /// One buffer, `[rows, vocab]` (the head's product writes it in place).
    data: Vec<Vec<f32>>,
    vocab: usize,
    /// Per member of the last pass: its first row and how many (`None`: it asked for none).
    spans: Vec<Option<(usize, usize)>>,
    /// The rows the head reads, gathered, then normed.
    picked: Vec<f32>,
    normed: Vec<f32>,
    /// [`Transformer::blocks_rows`]' working buffers, kept for the next pass too.
    blocks: RowBuffers,
}

impl BatchLogits {
    /// Width of a row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Member `i`'s first row and row count, if it asked for logits.
    pub fn span(&self, i: usize) -> Option<(usize, usize)> {
        self.spans.get(i).copied().flatten()
    }

    /// Member `i`'s rows `[n, vocab]`, if it asked for logits.
    pub fn rows(&self, i: usize) -> Option<&[f32]> {
        let (first, n) = self.span(i)?;
        let v = self.vocab;
        self.data.first()?.get(first * v..(first + n) * v)
    }

    /// Every row of the pass, to be split by [`BatchLogits::span`] (sampling edits rows in
    /// place).
    pub fn all_mut(&mut self) -> &mut [f32] {
        match self.data.first_mut() {
            Some(d) => d.as_mut_slice(),
            None => &mut [],
        }
    }
}

impl Transformer {
    /// The blocks of a batched pass by tensor ops: attention over the paged pool in place
    /// where it runs row by row ([`Self::row_attention`]), otherwise rotary, masks and the
    /// cache per member.
    fn blocks_batch(
        &self,
        mut x: Tensor,
        members: &[crate::paged_attention::Member],
        cache: &mut dyn BatchKvStore,
    ) -> Result<Tensor> {
        let in_place = self.row_attention();
        // Every layer attends in place: the per-member masks and biases are never read.
        let paged = in_place && (0..self.blocks.len()).all(|l| cache.pages(l).is_some());
        let mut slices = Vec::with_capacity(members.len());
        for m in members {
            let (start, t) = (m.start, m.len);
            let alibi = match &self.alibi_slopes {
                Some(s) if !paged => {
                    let keys = Tensor::arange(0u32, (start + t) as u32, &self.device)?
                        .to_dtype(DType::F32)?;
                    Some(s.unsqueeze(1)?.broadcast_mul(&keys.unsqueeze(0)?)?)
                }
                _ => None,
            };
            let (causal, windowed) = if paged {
                (None, None)
            } else {
                (
                    self.attention_mask(start, t, None)?,
                    match self.spec.attention.sliding_window {
                        Some(w) => self.attention_mask(start, t, Some(w))?,
                        None => None,
                    },
                )
            };
            slices.push(SeqSlice {
                start,
                offset: m.offset,
                len: t,
                rotary: match &self.rope {
                    Some(r) => Some(self.in_dtype(r.cos_sin(start, t, &self.device)?)?),
                    None => None,
                },
                causal,
                windowed,
                alibi,
            });
        }
        let all_rotary = match &self.rope {
            Some(_) if in_place => {
                let (cos, sin): (Vec<&Tensor>, Vec<&Tensor>) = slices
                    .iter()
                    .filter_map(|s| s.rotary.as_ref().map(|(c, s)| (c, s)))
                    .unzip();
                Some((Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?))
            }
            _ => None,
        };
        let slopes = match &self.alibi_slopes {
            Some(s) if in_place => Some(s.to_vec1::<f32>()?),
            _ => None,
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(block, &x, None, &mut |n| {
                if in_place {
                    if let Some(pages) = cache.pages(layer) {
                        let window = match self.spec.attention.sliding_window {
                            Some(w) if block.attn.windowed => Some(w),
                            _ => None,
                        };
                        let heads_out = self.attend_paged(
                            &block.attn,
                            n,
                            all_rotary.as_ref(),
                            window,
                            slopes.as_deref(),
                            members,
                            pages,
                        )?;
                        return self.project_out(&block.attn, &heads_out);
                    }
                }
                let (q, k, v) = self.qkv(&block.attn, n)?;
                let mut outs = Vec::with_capacity(slices.len());
                for (seq, s) in slices.iter().enumerate() {
                    let ctx = AttnContext {
                        start: s.start,
                        layer,
                        rotary: s.rotary.as_ref(),
                        mask: if block.attn.windowed {
                            s.windowed.as_ref()
                        } else {
                            s.causal.as_ref()
                        },
                        alibi: s.alibi.as_ref(),
                        rel_bias: None,
                        cross: None,
                    };
                    let mut member = BatchMember {
                        store: &mut *cache,
                        seq,
                    };
                    outs.push(self.attend(
                        &block.attn,
                        &q.narrow(1, s.offset, s.len)?,
                        &k.narrow(1, s.offset, s.len)?,
                        &v.narrow(1, s.offset, s.len)?,
                        &ctx,
                        &mut member,
                    )?);
                }
                self.project_out(&block.attn, &Tensor::cat(&outs, 1)?)
            })?;
        }
        Ok(x)
    }

    /// Every block is a pre-norm RMSNorm decoder block without extras that attends in place
    /// ([`Self::row_attention`]): [`Self::blocks_rows`] runs it on plain rows. Read from the
    /// spec and the loaded blocks (families are data): anything else keeps the tensor ops.
    fn row_blocks(&self) -> bool {
        let plain = |l: &Linear| l.compute.is_none() && !l.flat;
        let rms = |n: &Norm| n.kind == NormKind::RmsNorm && !n.differentiable;
        self.row_attention()
            && self.train.dropout.is_none()
            && self.spec.norm_placement == NormPlacement::Pre
            && self.spec.residual == Residual::Sequential
            && self.blocks.iter().all(|b| {
                let a = &b.attn;
                let projections = match &a.qkv {
                    Qkv::Split { q, k, v } => plain(q) && plain(k) && plain(v),
                    Qkv::Fused(l) => plain(l),
                };
                rms(&b.attn_norm)
                    && b.mlp_norm.as_ref().is_none_or(rms)
                    && b.cross.is_none()
                    && a.clip.is_none()
                    && a.q_norm.is_none()
                    && a.k_norm.is_none()
                    && projections
                    && plain(&a.out)
                    && b.mlp.gate.as_ref().is_none_or(plain)
                    && plain(&b.mlp.up)
                    && plain(&b.mlp.down)
            })
    }

    /// The blocks of a batched pass on plain row-major rows (see [`Self::row_blocks`]): the
    /// residual stream stays one buffer, each norm is fused with the residual add before it,
    /// rotary is applied as the projections are laid out for attention
    /// ([`crate::rows`]), and attention reads and writes the paged pool in place. The same
    /// numbers as [`Self::blocks_batch`], bit for bit.
    fn blocks_rows(
        &self,
        x: &Tensor,
        members: &[crate::paged_attention::Member],
        cache: &mut dyn BatchKvStore,
        bufs: &mut RowBuffers,
    ) -> Result<Tensor> {
        let (total, hidden) = (x.elem_count() / self.spec.hidden, self.spec.hidden);
        let mut xs = x.flatten_all()?.to_vec1::<f32>()?;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        if let Some(r) = &self.rope {
            for m in members {
                r.extend_cos_sin(m.start, m.len, m.start + m.len, &mut cos, &mut sin);
            }
        }
        let rotary = self.rope.as_ref().map(|r| crate::rows::Rotary {
            cos: &cos,
            sin: &sin,
            dims: r.dims(),
            interleaved: r.interleaved(),
        });
        let slopes = match &self.alibi_slopes {
            Some(s) => Some(s.to_vec1::<f32>()?),
            None => None,
        };
        let norm_weight = |n: &Norm| n.weight.to_vec1::<f32>();
        let mut normed = vec![0f32; total * hidden];
        if let Some(first) = self.blocks.first() {
            let n = &first.attn_norm;
            crate::rows::rms_norm(&xs, &norm_weight(n)?, n.eps, &mut normed);
        }
        for (layer, block) in self.blocks.iter().enumerate() {
            let pages = cache.pages(layer).ok_or_else(|| {
                ModelError::Input(format!("the KV store lends no pages for layer {layer}"))
            })?;
            let window = match self.spec.attention.sliding_window {
                Some(w) if block.attn.windowed => Some(w),
                _ => None,
            };
            self.attend_rows(
                &block.attn,
                &normed,
                total,
                rotary,
                window,
                slopes.as_deref(),
                members,
                pages,
                bufs,
            )?;
            let n = block.mlp_norm.as_ref().unwrap_or(&block.attn_norm);
            let a = rows_of_width(&bufs.out, total * hidden, "attention output")?;
            crate::rows::add_rms_norm(&mut xs, a, &norm_weight(n)?, n.eps, &mut normed);
            self.mlp_rows(&block.mlp, &normed, total, bufs)?;
            let m = rows_of_width(&bufs.down, total * hidden, "MLP output")?;
            // The residual add, with the next block's norm.
            match self.blocks.get(layer + 1) {
                Some(next) => {
                    let n = &next.attn_norm;
                    crate::rows::add_rms_norm(&mut xs, m, &norm_weight(n)?, n.eps, &mut normed);
                }
                None => crate::rows::add(&mut xs, m),
            }
        }
        Ok(Tensor::from_vec(xs, (1, total, hidden), &self.device)?)
    }

    /// [`Self::attend_paged`] and the output projection on plain rows: `x` is `[total, in]`;
    /// leaves `[total, hidden]` in `bufs.out[0]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows(
        &self,
        attn: &Attention,
        x: &[f32],
        total: usize,
        rotary: Option<crate::rows::Rotary>,
        window: Option<usize>,
        alibi: Option<&[f32]>,
        members: &[crate::paged_attention::Member],
        pages: crate::paged_attention::KvPages,
        bufs: &mut RowBuffers,
    ) -> Result<()> {
        let (nh, nkv, hd) = (attn.heads, attn.kv_heads, attn.head_dim);
        // `heads_major` writes every element of q and k.
        bufs.q.resize(nh * total * hd, 0.0);
        bufs.k.resize(nkv * total * hd, 0.0);
        let missing = || ModelError::Input("q/k/v projection missing".into());
        let v = match &attn.qkv {
            Qkv::Split {
                q: ql,
                k: kl,
                v: vl,
            } => {
                let p = &mut bufs.qkv;
                Linear::products_into(&[ql, kl, vl], x, total, &self.device, p)?;
                let [pq, pk, v] = p.as_slice() else {
                    return Err(missing());
                };
                crate::rows::heads_major(pq, nh * hd, 0, nh, hd, rotary, &mut bufs.q);
                crate::rows::heads_major(pk, nkv * hd, 0, nkv, hd, rotary, &mut bufs.k);
                v.as_slice()
            }
            Qkv::Fused(l) => {
                Linear::products_into(&[l], x, total, &self.device, &mut bufs.qkv)?;
                let p = bufs.qkv.first().ok_or_else(missing)?;
                let width = (nh + 2 * nkv) * hd;
                crate::rows::heads_major(p, width, 0, nh, hd, rotary, &mut bufs.q);
                crate::rows::heads_major(p, width, nh * hd, nkv, hd, rotary, &mut bufs.k);
                bufs.v.clear();
                bufs.v
                    .extend(p.chunks(width).flat_map(|row| &row[(nh + nkv) * hd..]));
                bufs.v.as_slice()
            }
        };
        let geometry = attn.geometry(window, alibi);
        bufs.heads.clear();
        bufs.heads.resize(total * nh * hd, 0.0);
        crate::paged_attention::attend(
            &geometry,
            members,
            &bufs.q,
            &bufs.k,
            v,
            pages,
            &mut bufs.heads,
        )
        .map_err(ModelError::Input)?;
        let out = &mut bufs.out;
        Linear::products_into(&[&attn.out], &bufs.heads, total, &self.device, out)?;
        Ok(())
    }

    /// [`Mlp::forward`] on plain rows `[total, hidden]`: SwiGLU's `silu(gate) · up` fused
    /// ([`crate::rows::silu_mul`]), other activations by candle's ops. Leaves `[total,
    /// hidden]` in `bufs.down[0]`.
    fn mlp_rows(&self, mlp: &Mlp, x: &[f32], total: usize, bufs: &mut RowBuffers) -> Result<()> {
        match (&mlp.gate, mlp.activation) {
            (Some(gate), Activation::SwiGlu) => {
                let both = &mut bufs.gate_up;
                Linear::products_into(&[gate, &mlp.up], x, total, &self.device, both)?;
                let [h, up] = both.as_mut_slice() else {
                    return Err(ModelError::Input("gate/up projection missing".into()));
                };
                crate::rows::silu_mul(h, up);
                let down = &mut bufs.down;
                Linear::products_into(&[&mlp.down], h, total, &self.device, down)?;
            }
            _ => {
                let x = Tensor::from_slice(x, (1, total, x.len() / total.max(1)), &self.device)?;
                bufs.down = vec![mlp.forward(&x, false)?.flatten_all()?.to_vec1::<f32>()?];
            }
        }
        Ok(())
    }
}

/// The one result in `outs`, checked to hold `len` values (the row kernels would otherwise
/// stop at the shorter of two buffers).
fn rows_of_width<'a>(outs: &'a [Vec<f32>], len: usize, what: &str) -> Result<&'a [f32]> {
    match outs {
        [one] if one.len() == len => Ok(one),
        _ => Err(ModelError::Input(format!(
            "{what}: expected one buffer of {len} values"
        ))),
    }
}

/// Buffers of a pass on plain rows ([`Transformer::blocks_rows`]), reused from layer to layer.
#[derive(Debug, Default)]
struct RowBuffers {
    /// The q/k/v projections (one buffer each, or one fused).
    qkv: Vec<Vec<f32>>,
    /// Queries and keys head by head, after rotary.
    q: Vec<f32>,
    k: Vec<f32>,
    /// Values taken out of a fused projection.
    v: Vec<f32>,
    /// Attention's output before the output projection, and after it.
    heads: Vec<f32>,
    out: Vec<Vec<f32>>,
    gate_up: Vec<Vec<f32>>,
    down: Vec<Vec<f32>>,
}

impl Transformer {
    /// Projections, rotary for all rows at once, then [`crate::paged_attention::attend`];
    /// returns the heads' outputs `[1, total, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_paged(
        &self,
        attn: &Attention,
        x: &Tensor,
        rotary: Option<&(Tensor, Tensor)>,
        window: Option<usize>,
        alibi: Option<&[f32]>,
        members: &[crate::paged_attention::Member],
        pages: crate::paged_attention::KvPages,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(attn, x)?;
        let (_, total, _) = q.dims3()?;
        let (nh, nkv, hd) = (attn.heads, attn.kv_heads, attn.head_dim);
        let q = q
            .reshape((1, total, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((1, total, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = match (&self.rope, rotary) {
            (Some(rope), Some((cos, sin))) => {
                (rope.apply(&q, cos, sin)?, rope.apply(&k, cos, sin)?)
            }
            _ => (q, k),
        };
        let geometry = attn.geometry(window, alibi);
        let mut out = vec![0f32; total * nh * hd];
        with_f32_slice(&q, |qs| {
            with_f32_slice(&k, |ks| {
                with_f32_slice(&v, |vs| {
                    crate::paged_attention::attend(&geometry, members, qs, ks, vs, pages, &mut out)
                })
            })
        })???
        .map_err(ModelError::Input)?;
        Ok(Tensor::from_vec(out, (1, total, nh * hd), &self.device)?)
    }
}

#[cfg(test)]
mod tests {
    //! The batched pass on plain rows ([`Transformer::blocks_rows`]) against the same pass by
    //! tensor ops ([`Transformer::blocks_batch`]): logits and the keys and values written to
    //! the pool, bit for bit.
    use super::*;
    use crate::paged_attention::KvPages;
    use crate::Model;

    /// A paged pool of the shape `[block][kv_head][slot][head_dim]` per layer.
    struct Pool<'t> {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
        tables: Vec<&'t [u32]>,
        starts: Vec<usize>,
        block_size: usize,
    }

    impl BatchKvStore for Pool<'_> {
        fn seq_len(&self, seq: usize) -> usize {
            self.starts[seq]
        }
        fn append(
            &mut self,
            _seq: usize,
            _layer: usize,
            _k: &Tensor,
            _v: &Tensor,
        ) -> candle_core::Result<(Tensor, Tensor)> {
            Err(candle_core::Error::Msg(
                "the test pool is paged only".into(),
            ))
        }
        fn pages(&mut self, layer: usize) -> Option<KvPages<'_>> {
            Some(KvPages {
                keys: self.keys.get_mut(layer)?,
                values: self.values.get_mut(layer)?,
                tables: &self.tables,
                block_size: self.block_size,
            })
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Prefill pieces of several lengths (more than 32 rows in all, so candle's norms run
    /// their parallel path), then decode rows, each pass by both paths over its own pool.
    fn rows_equal_tensor_ops(model: &Model, name: &str) {
        let t = &model.transformer;
        assert!(t.row_blocks(), "{name}: the row path does not apply");
        let spec = t.spec();
        let (bs, lens) = (4usize, [5usize, 1, 9, 40]);
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..n + 8)
                    .map(|j| ((j * 31 + i * 17 + 5) % spec.vocab_size) as u32)
                    .collect()
            })
            .collect();
        let blocks_each = (lens.iter().max().copied().unwrap_or(0) + 8).div_ceil(bs);
        let tables: Vec<Vec<u32>> = (0..lens.len())
            .map(|i| {
                (0..blocks_each)
                    .map(|b| (b * lens.len() + i) as u32)
                    .collect()
            })
            .collect();
        let layer_len =
            blocks_each * lens.len() * spec.attention.kv_heads * bs * spec.attention.head_dim;
        let pool = || Pool {
            keys: vec![vec![0f32; layer_len]; spec.layers],
            values: vec![vec![0f32; layer_len]; spec.layers],
            tables: tables.iter().map(|t| t.as_slice()).collect(),
            starts: vec![0; lens.len()],
            block_size: bs,
        };
        let (mut by_rows, mut by_ops) = (pool(), pool());
        for pass in 0..4 {
            let span = |n: usize| match pass {
                0 => (0, n),
                1 => (n, 4),
                p => (n + 2 + p, 1),
            };
            let inputs: Vec<BatchSeq> = seqs
                .iter()
                .zip(lens)
                .map(|(s, n)| {
                    let (a, len) = span(n);
                    BatchSeq {
                        ids: &s[a..a + len],
                        logits: Logits::All,
                    }
                })
                .collect();
            for p in [&mut by_rows, &mut by_ops] {
                p.starts = lens.iter().map(|&n| span(n).0).collect();
            }
            let a = t
                .forward_batch_with(&inputs, &mut by_rows, true)
                .expect("rows");
            let b = t
                .forward_batch_with(&inputs, &mut by_ops, false)
                .expect("tensor ops");
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                let (a, b) = (a.as_ref().expect("logits"), b.as_ref().expect("logits"));
                assert!(
                    bits(a) == bits(b),
                    "{name}: pass {pass}, sequence {i}: logits differ"
                );
            }
        }
        assert!(by_rows.keys == by_ops.keys, "{name}: keys differ");
        assert!(by_rows.values == by_ops.values, "{name}: values differ");
    }

    /// Tiny random-weight fixtures (dense f32 weights: candle's products): rotary over the two
    /// halves, a sliding window with grouped heads, q/k/v biases (Qwen2), YaRN's scaled
    /// rotary, a fused q/k/v projection (Baichuan).
    #[test]
    fn row_blocks_match_tensor_ops_on_fixtures() {
        for case in [
            "smollm2_shape",
            "mistral_swa",
            "qwen2",
            "llama_rope_yarn",
            "baichuan7b",
        ] {
            let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/parity")
                .join(case);
            let model = Model::load(&dir, &Device::Cpu).expect("load fixture");
            rows_equal_tensor_ops(&model, case);
        }
    }

    /// The default model (SmolLM2-135M Q4_1 GGUF: camelid's quantized kernels, interleaved
    /// rotary as GGUF stores it, real activations).
    #[test]
    fn row_blocks_match_tensor_ops_on_the_default_model() {
        let entry = crate::catalog::find(crate::catalog::DEFAULT_MODEL).expect("entry");
        let path = crate::catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull");
        let model = Model::load(&path, &Device::Cpu).expect("load SmolLM2");
        rows_equal_tensor_ops(&model, "SmolLM2 Q4_1");
    }
}
