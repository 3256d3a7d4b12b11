//! The normalized architecture spec: every decoder family is one value of [`ArchSpec`].
//!
//! A family file translates its `config.json` (or GGUF metadata) into this struct; the shared
//! transformer in [`crate::transformer`] reads nothing else. When a new family seems to need
//! its own forward code, the missing piece is a field here.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormSpec {
    pub kind: NormKind,
    pub eps: f64,
    /// LayerNorm has a learned bias in most families; RMSNorm never does.
    pub bias: bool,
}

impl NormSpec {
    pub fn rms(eps: f64) -> Self {
        Self {
            kind: NormKind::RmsNorm,
            eps,
            bias: false,
        }
    }
    pub fn layer(eps: f64) -> Self {
        Self {
            kind: NormKind::LayerNorm,
            eps,
            bias: true,
        }
    }
}

/// Where the per-block norms sit relative to the residual connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormPlacement {
    /// `x + f(norm(x))` (GPT-2, LLaMA and nearly everything since).
    Pre,
    /// `norm(x + f(x))` (original transformer, BERT, OPT-350m).
    Post,
}

/// How the rotary frequencies are stretched for contexts longer than training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear {
        factor: f64,
    },
    /// Base grows once the sequence passes `max_positions` (transformers' `dynamic`).
    DynamicNtk {
        factor: f64,
        max_positions: usize,
    },
    /// Qwen (v1)'s dynamic NTK: a sequence whose first forward pass has `len > seq_length`
    /// tokens runs with base `theta * alpha^(d/(d-2))`, `alpha = 2^ceil(log2(len/seq_length)
    /// + 1) - 1`; later passes of the sequence (decoding) keep that alpha, as Qwen's code does.
    QwenNtk {
        seq_length: usize,
    },
    /// LLaMA-3.1 frequency bands.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: usize,
    },
    /// YaRN: blended interpolation plus an attention temperature on cos/sin.
    Yarn {
        factor: f64,
        original_max_positions: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Multiplier applied to cos and sin; `None` means `0.1 ln(factor) + 1`.
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotarySpec {
    pub theta: f64,
    /// Share of each head's dimensions that rotate (GPT-NeoX `rotary_pct`, GPT-J `rotary_dim`).
    pub fraction: f64,
    /// `true`: rotate adjacent pairs (GPT-J, GGUF LLaMA); `false`: rotate the two halves
    /// (HF LLaMA, GPT-NeoX).
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

impl RotarySpec {
    /// Unscaled rotary over `fraction` of each head.
    pub fn new(theta: f64, fraction: f64, interleaved: bool) -> Self {
        Self {
            theta,
            fraction,
            interleaved,
            scaling: RopeScaling::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Positions {
    /// Learned absolute embeddings; OPT stores them shifted by `offset` (2).
    Learned {
        offset: usize,
    },
    Rotary(RotarySpec),
    /// Linear biases on attention scores (BLOOM, MPT).
    Alibi {
        max_bias: f64,
        slopes: AlibiSlopes,
        /// The bias goes in before the softmax scale, so it is scaled too (Falcon).
        scaled: bool,
    },
    /// T5-style learned biases per head over log-spaced relative-distance buckets (LaMDA, T5).
    RelativeBuckets {
        buckets: usize,
        max_distance: usize,
    },
    /// Transformer-XL relative attention: a per-layer projection of sinusoidal relative
    /// positions plus two learned bias vectors (Gopher, Chinchilla).
    RelativeXl,
    None,
}

/// How a fused QKV checkpoint orders its output rows. The loader reorders them into
/// `[q | k | v]`, the only layout the transformer knows.
/// The two published ways to extend ALiBi slopes to head counts that are not a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlibiSlopes {
    /// BLOOM: the next power's odd-indexed slopes appended.
    Bloom,
    /// MPT: the next power's slopes, odd then even indices, truncated.
    Mpt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkvPacking {
    /// `[q | k | v]` (GPT-2, Baichuan, Falcon-7B, MPT).
    Sequential,
    /// `[q₀ k₀ v₀ | q₁ k₁ v₁ | ...]`, one triple per head (GPT-NeoX, BLOOM).
    PerHead,
    /// Per kv group: the group's query heads, then its key and value (Falcon-40B).
    PerKvGroup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkvLayout {
    /// Separate q, k and v projections.
    Split,
    /// One projection whose output rows are `[q | k | v]`. Families whose checkpoints
    /// interleave per head are reordered into this layout at load.
    Fused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub heads: usize,
    /// Equal to `heads` for MHA, 1 for MQA, in between for GQA.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub out_bias: bool,
    pub qkv_layout: QkvLayout,
    /// Multiplier on `q·k`; `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f64>,
    /// Each token sees at most this many tokens (itself included).
    pub sliding_window: Option<usize>,
    /// Which layers use the window (GPT-Neo alternates); `None`: all of them.
    pub window_layers: Option<Vec<bool>>,
    pub qkv_packing: QkvPacking,
    /// Clamp q, k and v to ±this (MPT `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// LayerNorm over the whole q and k projections (MPT `qk_ln`).
    pub qk_norm: bool,
    /// Qwen (v1)'s log-n attention `n`: the query at position `p` (from 0) is multiplied by
    /// `ln(p + 1) / ln(n)` when `p + 1 > n` (inference only).
    #[serde(default)]
    pub logn_queries: Option<usize>,
}

impl AttentionSpec {
    pub fn scale(&self) -> f64 {
        self.softmax_scale
            .unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu,
    /// `down(gelu(gate(x)) * up(x))` (T5 v1.1's gated-GELU, LaMDA, GLM-130B).
    GeGlu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (GPT-2's `gelu_new`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn is_gated(self) -> bool {
        matches!(self, Activation::SwiGlu | Activation::GeGlu)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub hidden: usize,
    pub activation: Activation,
    pub bias: bool,
    /// Gate and up projections stored as one `[2·hidden, in]` matrix, gate rows first
    /// (ChatGLM's `dense_h_to_4h`); split at load.
    pub fused_gate_up: bool,
}

impl MlpSpec {
    /// A plain (unfused) MLP.
    pub fn new(hidden: usize, activation: Activation, bias: bool) -> Self {
        Self {
            hidden,
            activation,
            bias,
            fused_gate_up: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Residual {
    /// `x = x + attn(norm1(x)); x = x + mlp(norm2(x))`.
    Sequential,
    /// `x = x + attn(norm1(x)) + mlp(norm(x))` with one shared norm (GPT-J, Falcon-7B) or two.
    Parallel { shared_norm: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchSpec {
    /// Registry name of the family that produced this spec.
    pub family: String,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub max_positions: usize,
    pub norm: NormSpec,
    pub norm_placement: NormPlacement,
    pub positions: Positions,
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
    pub residual: Residual,
    pub final_norm: bool,
    /// The output head reuses the token embedding matrix.
    pub tied_head: bool,
    pub head_bias: bool,
    /// Token embeddings narrower than the hidden size, with `proj_in` / `proj_out`
    /// projections around the blocks (OPT-350m `word_embed_proj_dim`).
    pub embed_dim: Option<usize>,
    /// A LayerNorm right after the token embedding (BLOOM, BERT).
    pub embed_norm: bool,
    /// Decoders attend causally; encoders (BERT) see the whole sequence.
    pub causal: bool,
    /// Segment ("token type") embeddings added to the input (BERT); 0 for none.
    pub type_vocab_size: usize,
    /// Whether the model ends in a vocabulary head (encoders used for embeddings do not).
    pub lm_head: bool,
    /// Scale each head row to unit L2 norm at load (Baichuan2's NormHead).
    pub normalize_head_rows: bool,
    /// Multiplier on the final hidden state before the head (T5 with a tied head: `d_model^-0.5`).
    pub head_scale: Option<f64>,
    /// Encoder-decoder models (T5): the encoder's layer count, 0 for decoder-only models. The
    /// spec then describes the decoder; [`ArchSpec::encoder_spec`] derives the encoder.
    pub encoder_layers: usize,
    /// Which stack of the checkpoint this spec runs.
    pub stack: Stack,
}

/// The stacks of an encoder-decoder checkpoint share one block; what differs is the tensor-name
/// prefix (llama.cpp's `enc.` / `dec.`) and the decoder's cross-attention to the encoder output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stack {
    /// A model that is one stack (every decoder-only model, BERT).
    Single,
    Encoder,
    /// Each block attends to the encoder output after its self-attention.
    Decoder,
}

impl Stack {
    /// Prefix of the stack's block and final-norm tensor names.
    pub fn prefix(self) -> &'static str {
        match self {
            Stack::Single => "",
            Stack::Encoder => "enc.",
            Stack::Decoder => "dec.",
        }
    }
}

impl ArchSpec {
    /// A LLaMA-shaped spec; families start here and change what differs.
    pub fn llama_like(family: &str) -> Self {
        Self {
            family: family.to_string(),
            vocab_size: 32000,
            hidden: 4096,
            layers: 32,
            max_positions: 2048,
            norm: NormSpec::rms(1e-6),
            norm_placement: NormPlacement::Pre,
            positions: Positions::Rotary(RotarySpec::new(10000.0, 1.0, false)),
            attention: AttentionSpec {
                heads: 32,
                kv_heads: 32,
                head_dim: 128,
                qkv_bias: false,
                out_bias: false,
                qkv_layout: QkvLayout::Split,
                softmax_scale: None,
                sliding_window: None,
                window_layers: None,
                qkv_packing: QkvPacking::Sequential,
                clip_qkv: None,
                qk_norm: false,
                logn_queries: None,
            },
            mlp: MlpSpec::new(11008, Activation::SwiGlu, false),
            residual: Residual::Sequential,
            final_norm: true,
            tied_head: false,
            head_bias: false,
            embed_dim: None,
            embed_norm: false,
            causal: true,
            type_vocab_size: 0,
            lm_head: true,
            normalize_head_rows: false,
            head_scale: None,
            encoder_layers: 0,
            stack: Stack::Single,
        }
    }

    /// The encoder of an encoder-decoder spec: the same block, bidirectional, without
    /// cross-attention or head.
    pub fn encoder_spec(&self) -> Self {
        let mut e = self.clone();
        e.layers = self.encoder_layers;
        e.encoder_layers = 0;
        e.stack = Stack::Encoder;
        e.causal = false;
        e.lm_head = false;
        e.head_scale = None;
        e
    }

    /// Positions a sequence may reach in the batched (serving) forward pass. Qwen's dynamic NTK
    /// fixes its rotary base by the length of a sequence's first pass, which the paged cache
    /// (chunked prefill, shared prefixes) does not reproduce, so serving stops at `seq_length`
    /// for those models rather than drift from the reference.
    pub fn batched_positions(&self) -> usize {
        match &self.positions {
            Positions::Rotary(RotarySpec {
                scaling: RopeScaling::QwenNtk { seq_length },
                ..
            }) => self.max_positions.min(*seq_length),
            _ => self.max_positions,
        }
    }

    /// Sets the head counts, deriving the head size from the hidden size.
    pub fn set_heads(&mut self, heads: usize, kv_heads: usize) -> Result<(), String> {
        if heads == 0 || !self.hidden.is_multiple_of(heads) {
            return Err(format!(
                "hidden size {} is not divisible by {heads} attention heads",
                self.hidden
            ));
        }
        self.attention.heads = heads;
        self.attention.kv_heads = kv_heads;
        self.attention.head_dim = self.hidden / heads;
        Ok(())
    }

    /// Checks the invariants the transformer relies on, so a bad config fails at load with a
    /// message instead of a shape error deep in a forward pass.
    pub fn validate(&self) -> Result<(), String> {
        let a = &self.attention;
        if self.vocab_size == 0 || self.hidden == 0 || self.layers == 0 {
            return Err("vocab_size, hidden size and layer count must be positive".into());
        }
        if a.heads == 0 || a.kv_heads == 0 || a.head_dim == 0 {
            return Err("attention heads, kv heads and head dim must be positive".into());
        }
        if !a.heads.is_multiple_of(a.kv_heads) {
            return Err(format!(
                "{} attention heads are not a multiple of {} kv heads",
                a.heads, a.kv_heads
            ));
        }
        if self.stack == Stack::Decoder
            && (self.norm_placement, self.residual) != (NormPlacement::Pre, Residual::Sequential)
        {
            return Err("cross-attention needs pre-norm sequential blocks".into());
        }
        if let Positions::RelativeBuckets {
            buckets,
            max_distance,
        } = self.positions
        {
            if buckets < 4 || max_distance <= buckets / 2 {
                return Err(format!(
                    "relative attention needs at least 4 buckets and a max distance above half of them (got {buckets} buckets, max distance {max_distance})"
                ));
            }
        }
        if let Positions::Rotary(r) = &self.positions {
            let rot = self.rotary_dims(r);
            if rot == 0 || !rot.is_multiple_of(2) || rot > a.head_dim {
                return Err(format!(
                    "rotary dimensions {rot} must be even and at most head dim {}",
                    a.head_dim
                ));
            }
        }
        Ok(())
    }

    pub fn rotary_dims(&self, r: &RotarySpec) -> usize {
        let d = (self.attention.head_dim as f64 * r.fraction).round() as usize;
        d - d % 2
    }

    /// Parameter count implied by the spec (embeddings and head counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden as u64;
        let a = &self.attention;
        let q = (a.heads * a.head_dim) as u64;
        let kv = (a.kv_heads * a.head_dim) as u64;
        let mut attn = h * (q + 2 * kv) + q * h;
        if a.qkv_bias {
            attn += q + 2 * kv;
        }
        if a.out_bias {
            attn += h;
        }
        let f = self.mlp.hidden as u64;
        let mats = if self.mlp.activation.is_gated() { 3 } else { 2 };
        let mut mlp = mats * h * f;
        if self.mlp.bias {
            mlp += f * (mats - 1) + h;
        }
        let norm_params = if self.norm.bias { 2 * h } else { h };
        let norms_per_layer = match self.residual {
            Residual::Parallel { shared_norm: true } => 1,
            _ => 2,
        };
        let mut per_layer = attn + mlp + norms_per_layer * norm_params;
        if self.positions == Positions::RelativeXl {
            per_layer += h * q + 2 * q;
        }
        let v = self.vocab_size as u64;
        let e = self.embed_dim.unwrap_or(self.hidden) as u64;
        let mut total = per_layer * self.layers as u64 + v * e;
        if self.encoder_layers > 0 {
            // The encoder's blocks, final norm and bucket table; a cross-attention and its norm
            // in every decoder block.
            total += per_layer * self.encoder_layers as u64 + norm_params;
            total += (attn + norm_params) * self.layers as u64;
            if let Positions::RelativeBuckets { buckets, .. } = self.positions {
                total += (buckets * a.heads) as u64;
            }
        }
        if !self.tied_head {
            total += v * e;
        }
        if e != h {
            total += 2 * e * h;
        }
        if self.embed_norm {
            total += norm_params;
        }
        if !self.lm_head && !self.tied_head {
            total -= v * e;
        }
        total += self.type_vocab_size as u64 * h;
        if self.final_norm {
            total += norm_params;
        }
        match self.positions {
            Positions::Learned { offset } => total += (self.max_positions + offset) as u64 * h,
            Positions::RelativeBuckets { buckets, .. } => total += (buckets * a.heads) as u64,
            _ => {}
        }
        total
    }
}
