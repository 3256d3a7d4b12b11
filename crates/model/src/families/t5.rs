//! T5, Flan-T5, mT5 (and T0): an encoder-decoder. Both stacks are the shared pre-norm block with
//! RMS-style "T5 LayerNorm", relative-position buckets (bidirectional in the encoder, looking
//! back in the decoder; one table per stack, in its first block) and unscaled attention; the
//! decoder's blocks also attend to the encoder output. v1.0 uses a ReLU MLP and a tied head fed
//! `d_model^-0.5 · h`; v1.1 / Flan-T5 / mT5 a gated GELU and an untied, unscaled head.

use super::Family;
use crate::spec::{Activation, ArchSpec, MlpSpec, NormSpec, Positions, Stack};

pub static T5: Family = Family {
    name: "t5",
    title: "T5 / Flan-T5 / mT5 (encoder-decoder)",
    checkpoints: "`t5-small`, `google/flan-t5-base`, `google/mt5-small`, `bigscience/T0_3B`",
    model_types: &["t5", "mt5"],
    gguf_archs: &[],
    from_config: |cfg| {
        let mut s = ArchSpec::llama_like("t5");
        s.vocab_size = cfg.usize("vocab_size")?;
        s.hidden = cfg.usize("d_model")?;
        s.encoder_layers = cfg.usize("num_layers")?;
        s.layers = cfg.opt_usize("num_decoder_layers")?.unwrap_or(s.encoder_layers);
        s.stack = Stack::Decoder;
        // Relative positions impose no length limit.
        s.max_positions = usize::MAX / 2;
        s.norm = NormSpec::rms(cfg.f64_or("layer_norm_epsilon", 1e-6)?);
        s.positions = Positions::RelativeBuckets {
            buckets: cfg.opt_usize("relative_attention_num_buckets")?.unwrap_or(32),
            max_distance: cfg.opt_usize("relative_attention_max_distance")?.unwrap_or(128),
        };
        let heads = cfg.usize("num_heads")?;
        let a = &mut s.attention;
        a.heads = heads;
        a.kv_heads = heads;
        a.head_dim = cfg.usize("d_kv")?;
        a.softmax_scale = Some(1.0);
        let proj = cfg.opt_str("feed_forward_proj")?.unwrap_or("relu");
        let activation = match proj {
            "relu" => Activation::Relu,
            "gated-gelu" => Activation::GeGlu,
            "gated-silu" => Activation::SwiGlu,
            other => {
                return Err(cfg.err(format!(
                    "feed_forward_proj \"{other}\" is not supported (relu, gated-gelu, gated-silu are)"
                )))
            }
        };
        s.mlp = MlpSpec::new(cfg.usize("d_ff")?, activation, false);
        // The head is `lm_head` when the checkpoint has one, else the shared embedding; the
        // decoder output is scaled by d_model^-0.5 exactly when the embeddings are tied
        // (transformers 5 writes that choice as `scale_decoder_outputs`).
        s.tied_head = false;
        let tied = cfg.bool_or("tie_word_embeddings", true)?;
        if cfg.bool_or("scale_decoder_outputs", tied)? {
            s.head_scale = Some((s.hidden as f64).powf(-0.5));
        }
        Ok(s)
    },
    from_gguf: None,
    hf_tensor_names: &[
        ("token_embd", "shared|encoder.embed_tokens|decoder.embed_tokens"),
        ("enc.blk.{i}.attn_norm", "encoder.block.{i}.layer.0.layer_norm"),
        ("enc.blk.{i}.attn_q", "encoder.block.{i}.layer.0.SelfAttention.q"),
        ("enc.blk.{i}.attn_k", "encoder.block.{i}.layer.0.SelfAttention.k"),
        ("enc.blk.{i}.attn_v", "encoder.block.{i}.layer.0.SelfAttention.v"),
        ("enc.blk.{i}.attn_output", "encoder.block.{i}.layer.0.SelfAttention.o"),
        (
            "enc.blk.{i}.attn_rel_b",
            "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias",
        ),
        ("enc.blk.{i}.ffn_norm", "encoder.block.{i}.layer.1.layer_norm"),
        ("enc.blk.{i}.ffn_gate", "encoder.block.{i}.layer.1.DenseReluDense.wi_0"),
        (
            "enc.blk.{i}.ffn_up",
            "encoder.block.{i}.layer.1.DenseReluDense.wi_1|encoder.block.{i}.layer.1.DenseReluDense.wi",
        ),
        ("enc.blk.{i}.ffn_down", "encoder.block.{i}.layer.1.DenseReluDense.wo"),
        ("enc.output_norm", "encoder.final_layer_norm"),
        ("dec.blk.{i}.attn_norm", "decoder.block.{i}.layer.0.layer_norm"),
        ("dec.blk.{i}.attn_q", "decoder.block.{i}.layer.0.SelfAttention.q"),
        ("dec.blk.{i}.attn_k", "decoder.block.{i}.layer.0.SelfAttention.k"),
        ("dec.blk.{i}.attn_v", "decoder.block.{i}.layer.0.SelfAttention.v"),
        ("dec.blk.{i}.attn_output", "decoder.block.{i}.layer.0.SelfAttention.o"),
        (
            "dec.blk.{i}.attn_rel_b",
            "decoder.block.{i}.layer.0.SelfAttention.relative_attention_bias",
        ),
        ("dec.blk.{i}.cross_attn_norm", "decoder.block.{i}.layer.1.layer_norm"),
        ("dec.blk.{i}.cross_attn_q", "decoder.block.{i}.layer.1.EncDecAttention.q"),
        ("dec.blk.{i}.cross_attn_k", "decoder.block.{i}.layer.1.EncDecAttention.k"),
        ("dec.blk.{i}.cross_attn_v", "decoder.block.{i}.layer.1.EncDecAttention.v"),
        ("dec.blk.{i}.cross_attn_o", "decoder.block.{i}.layer.1.EncDecAttention.o"),
        ("dec.blk.{i}.ffn_norm", "decoder.block.{i}.layer.2.layer_norm"),
        ("dec.blk.{i}.ffn_gate", "decoder.block.{i}.layer.2.DenseReluDense.wi_0"),
        (
            "dec.blk.{i}.ffn_up",
            "decoder.block.{i}.layer.2.DenseReluDense.wi_1|decoder.block.{i}.layer.2.DenseReluDense.wi",
        ),
        ("dec.blk.{i}.ffn_down", "decoder.block.{i}.layer.2.DenseReluDense.wo"),
        ("dec.output_norm", "decoder.final_layer_norm"),
        ("output", "lm_head"),
    ],
    hf_transposed: &[],
};
